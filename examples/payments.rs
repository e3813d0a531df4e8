//! The demo "payments" backend, also the upstream of every end-to-end test.
//!
//! One process is one instance of one API version (`--version v1|v2`). It answers the payments
//! API in its own version's format, echoes what it received (so a test can see what the filter
//! forwarded), counts executions per `Idempotency-Key`, and has switches for the behaviours
//! the rollout capabilities react to (readiness, drain signal, slow, failing, streaming,
//! resetting responses).
//!
//! ```text
//! payments --name stable --version v1 --listen 127.0.0.1:8081
//! ```
//! It prints `LISTENING <addr>` once it accepts connections (`--listen 127.0.0.1:0` picks a
//! free port).
//!
//! Query parameters understood on every request: `delay_ms=N` (answer after N ms),
//! `status=N` (answer with that status), `reset=1` (send the headers and part of the body, then
//! drop the connection), `trailers=1` (end the body with trailers).
//!
//! Control endpoints (never proxied in the demo; tests call them directly):
//! `GET /_admin/executions` -> `{"<key>": count}`, `GET /_admin/requests` -> count,
//! `POST /_admin/ready?status=N` -> what `/ready` answers, `POST /_admin/drain-signal?on=1` ->
//! responses carry `x-drain: 1`, `GET /_admin/last` -> the last request as seen (echo form),
//! `POST /_admin/fault?error_pct=P&delay_ms=N` -> from now on P of every 100 requests answer
//! 503 and every request waits N ms more (a canary turning bad at a known moment; `0` and `0`
//! heal it), `GET /_admin/ledger` -> every execution with its times and the resets (below),
//! `GET /_admin/inflight` -> executions running now.
//!
//! `--reset-pct P` (chaos): P of every 100 requests lose their connection without an answer,
//! alternately before the operation executes (it never ran) and after it executed (it ran, the
//! caller cannot know): the second is what idempotency keys exist for. The ledger tells them
//! apart: `{"executions": [{"key", "start_ms", "end_ms", "reset_after"}], "resets_before": N,
//! "resets_after": N}` (times in Unix ms; `end_ms` is null while it runs).

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;

type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

struct State {
    name: String,
    version: String,
    ready_status: AtomicU16,
    drain_signal: AtomicBool,
    fault_error_pct: AtomicU64,
    fault_delay_ms: AtomicU64,
    requests: AtomicU64,
    next_id: AtomicU64,
    executions: Mutex<BTreeMap<String, u64>>,
    last: Mutex<Value>,
    /// Requests reset per 100 (`--reset-pct`), the resets so far and the ledger.
    reset_pct: u64,
    resets: AtomicU64,
    resets_before: AtomicU64,
    resets_after: AtomicU64,
    inflight: AtomicU64,
    ledger: Mutex<Vec<Execution>>,
}

/// One execution of an operation with an idempotency key.
struct Execution {
    key: String,
    start_ms: u64,
    end_ms: Option<u64>,
    reset_after: bool,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// An execution in progress: its end is recorded when the answer is ready, or when the
/// request is dropped (its connection closed first).
struct Running<'a> {
    state: &'a State,
    i: usize,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.state.inflight.fetch_sub(1, Ordering::SeqCst);
        if let Some(e) = self.state.ledger.lock().unwrap().get_mut(self.i) {
            e.end_ms = Some(unix_ms());
        }
    }
}

/// Why a request lost its connection (the error hyper answers with: it closes the connection
/// without a response).
#[derive(Debug)]
struct Reset(&'static str);

impl std::fmt::Display for Reset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "connection reset {}", self.0)
    }
}

impl std::error::Error for Reset {}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut name = "payments".to_string();
    let mut version = "v1".to_string();
    let mut listen = "127.0.0.1:8081".to_string();
    let mut reset_pct = 0u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--name" => name = val(),
            "--version" => version = val(),
            "--listen" => listen = val(),
            "--reset-pct" => {
                reset_pct = val()
                    .parse::<u64>()
                    .ok()
                    .filter(|p| *p <= 100)
                    .unwrap_or_else(|| usage("--reset-pct must be 0 to 100"))
            }
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    if version != "v1" && version != "v2" {
        usage("--version must be v1 or v2");
    }
    let listener = match TcpListener::bind(&listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("payments: cannot listen on {listen}: {e}");
            std::process::exit(1);
        }
    };
    let addr = listener.local_addr().expect("bound socket has an address");
    println!("LISTENING {addr}");
    eprintln!("payments: {name} ({version}) listening on {addr}");
    let state = Arc::new(State {
        name,
        version,
        ready_status: AtomicU16::new(200),
        drain_signal: AtomicBool::new(false),
        fault_error_pct: AtomicU64::new(0),
        fault_delay_ms: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        next_id: AtomicU64::new(1),
        executions: Mutex::new(BTreeMap::new()),
        last: Mutex::new(Value::Null),
        reset_pct,
        resets: AtomicU64::new(0),
        resets_before: AtomicU64::new(0),
        resets_after: AtomicU64::new(0),
        inflight: AtomicU64::new(0),
        ledger: Mutex::new(Vec::new()),
    });
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(state.clone(), req));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn usage(err: &str) -> ! {
    if !err.is_empty() {
        eprintln!("payments: {err}");
    }
    eprintln!("usage: payments [--name NAME] [--version v1|v2] [--listen ADDR] [--reset-pct P]");
    std::process::exit(if err.is_empty() { 0 } else { 2 });
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into())
        .map_err(|e: Infallible| match e {})
        .boxed()
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, Reset> {
    let q = query(&req);
    let path = req.uri().path().to_string();
    let method = req.method().to_string();
    let headers: Map<String, Value> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()),
            )
        })
        .collect();
    let idem_key = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let is_admin = path.starts_with("/_admin/");
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        // The client (or the proxy) aborted the request before its body was complete: like a
        // real application, do not execute it.
        Err(_) => {
            return Ok(Response::builder()
                .status(StatusCode::BAD_REQUEST)
                .body(full("request body aborted"))
                .expect("valid response"))
        }
    };

    if is_admin {
        return Ok(admin(&state, &method, &path, &q));
    }
    let n = state.requests.fetch_add(1, Ordering::SeqCst);
    // Spread evenly: P of every 100 consecutive requests, alternately before and after the
    // operation.
    let reset_after = if n % 100 < state.reset_pct {
        if state.resets.fetch_add(1, Ordering::SeqCst) % 2 == 0 {
            state.resets_before.fetch_add(1, Ordering::SeqCst);
            return Err(Reset("before executing"));
        }
        true
    } else {
        false
    };
    let body_json: Value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    let seen = json!({
        "instance": state.name,
        "version": state.version,
        "method": method,
        "path": path,
        "query": q,
        "headers": headers,
        "body": body_json,
        "body_bytes": body.len(),
    });
    *state.last.lock().unwrap() = seen.clone();
    let mut executing = None;
    if method != "GET" && method != "HEAD" {
        if let Some(key) = &idem_key {
            *state
                .executions
                .lock()
                .unwrap()
                .entry(key.clone())
                .or_default() += 1;
            let mut ledger = state.ledger.lock().unwrap();
            executing = Some(ledger.len());
            ledger.push(Execution {
                key: key.clone(),
                start_ms: unix_ms(),
                end_ms: None,
                reset_after,
            });
            state.inflight.fetch_add(1, Ordering::SeqCst);
        }
    }
    let running = executing.map(|i| Running { state: &state, i });
    let resp = respond(&state, n, &method, &path, &q, &seen).await;
    drop(running);
    if reset_after {
        state.resets_after.fetch_add(1, Ordering::SeqCst);
        return Err(Reset("after executing"));
    }
    Ok(resp)
}

/// The answer to a request (after its execution was recorded).
async fn respond(
    state: &State,
    n: u64,
    method: &str,
    path: &str,
    q: &BTreeMap<String, String>,
    seen: &Value,
) -> Response<Body> {
    if let Some(ms) = q.get("delay_ms").and_then(|v| v.parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let fault_delay = state.fault_delay_ms.load(Ordering::SeqCst);
    if fault_delay > 0 {
        tokio::time::sleep(Duration::from_millis(fault_delay)).await;
    }
    // Spread evenly: P of every 100 consecutive requests.
    if n % 100 < state.fault_error_pct.load(Ordering::SeqCst) {
        let resp = Response::builder()
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .header("content-type", "application/json")
            .body(full(r#"{"error":"fault injected"}"#))
            .expect("valid response");
        return decorate(state, resp);
    }

    let (status, body) = if path == "/ready" {
        let s = state.ready_status.load(Ordering::SeqCst);
        (s, json!({"ready": s < 300, "instance": state.name}))
    } else if path == "/events" {
        return decorate(state, sse(q));
    } else if let Some(rest) = payments_path(path, &state.version) {
        payments(state, method, rest, &seen["body"])
    } else {
        (200, seen.clone())
    };
    let status = q
        .get("status")
        .and_then(|s| s.parse::<u16>().ok())
        .unwrap_or(status);
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    if q.get("reset").map(String::as_str) == Some("1") {
        return decorate(state, resetting(status, bytes));
    }
    if q.get("trailers").map(String::as_str) == Some("1") {
        return decorate(state, with_trailers(status, bytes));
    }
    let resp = Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::OK))
        .header("content-type", "application/json")
        .body(full(bytes))
        .expect("valid response");
    decorate(state, resp)
}

/// The body in one DATA frame, then trailers (`x-checksum: <body length>`) end the stream
/// (over HTTP/2; HTTP/1.1 chunked carries them only where the peer enables trailers).
fn with_trailers(status: u16, bytes: Vec<u8>) -> Response<Body> {
    let mut trailers = hyper::HeaderMap::new();
    trailers.insert(
        "x-checksum",
        bytes.len().to_string().parse().expect("digits"),
    );
    let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
        Ok(Frame::data(Bytes::from(bytes))),
        Ok(Frame::trailers(trailers)),
    ];
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::OK))
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(futures::stream::iter(
            frames,
        ))))
        .expect("valid response")
}

/// Headers every answer carries: who answered, and the drain signal when it is on.
fn decorate(state: &State, mut resp: Response<Body>) -> Response<Body> {
    let h = resp.headers_mut();
    h.insert(
        "x-upstream",
        state.name.parse().expect("name is a header value"),
    );
    h.insert("x-api-version", state.version.parse().expect("v1/v2"));
    if state.drain_signal.load(Ordering::SeqCst) {
        h.insert("x-drain", "1".parse().expect("static"));
    }
    resp
}

fn admin(state: &State, method: &str, path: &str, q: &BTreeMap<String, String>) -> Response<Body> {
    let body = match (method, path) {
        ("GET", "/_admin/executions") => json!(*state.executions.lock().unwrap()),
        ("GET", "/_admin/requests") => json!(state.requests.load(Ordering::SeqCst)),
        ("GET", "/_admin/last") => state.last.lock().unwrap().clone(),
        ("GET", "/_admin/inflight") => json!(state.inflight.load(Ordering::SeqCst)),
        ("GET", "/_admin/ledger") => {
            let executions: Vec<Value> = state
                .ledger
                .lock()
                .unwrap()
                .iter()
                .map(|e| {
                    json!({"key": e.key, "start_ms": e.start_ms, "end_ms": e.end_ms,
                           "reset_after": e.reset_after})
                })
                .collect();
            json!({
                "executions": executions,
                "resets_before": state.resets_before.load(Ordering::SeqCst),
                "resets_after": state.resets_after.load(Ordering::SeqCst),
            })
        }
        ("POST", "/_admin/ready") => {
            let s = q.get("status").and_then(|s| s.parse().ok()).unwrap_or(200);
            state.ready_status.store(s, Ordering::SeqCst);
            json!({"ready_status": s})
        }
        ("POST", "/_admin/fault") => {
            let num = |k: &str| q.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            state
                .fault_error_pct
                .store(num("error_pct").min(100), Ordering::SeqCst);
            state
                .fault_delay_ms
                .store(num("delay_ms"), Ordering::SeqCst);
            json!({"error_pct": num("error_pct"), "delay_ms": num("delay_ms")})
        }
        ("POST", "/_admin/drain-signal") => {
            let on = q.get("on").map(String::as_str) != Some("0");
            state.drain_signal.store(on, Ordering::SeqCst);
            json!({"drain_signal": on})
        }
        _ => {
            return Response::builder()
                .status(404)
                .body(full("unknown admin endpoint"))
                .expect("valid response")
        }
    };
    Response::builder()
        .header("content-type", "application/json")
        .body(full(serde_json::to_vec(&body).unwrap_or_default()))
        .expect("valid response")
}

fn payments_path<'a>(path: &'a str, version: &str) -> Option<&'a str> {
    let prefix = if version == "v1" {
        "/api/v1/payments"
    } else {
        "/api/v2/payments"
    };
    let rest = path.strip_prefix(prefix)?;
    (rest.is_empty() || rest.starts_with('/')).then_some(rest)
}

/// The payments API in this instance's own format.
///
/// v1: `POST {amount, currency, customer_id}` -> `{transaction_id, status, amount, currency,
/// customer_id}`; `GET` -> `{payments: [{transaction_id, status}]}`.
/// v2: `POST {amount: {value, currency}, customer: {id, email}}` -> `{id, status, amount:
/// {value, currency}, customer: {id}}`; `GET` -> `{data: [{id, status}]}`.
fn payments(state: &State, method: &str, rest: &str, body: &Value) -> (u16, Value) {
    let v1 = state.version == "v1";
    if method == "GET" && rest.is_empty() {
        let items: Vec<Value> = (1..=3)
            .map(|i| {
                if v1 {
                    json!({"transaction_id": format!("tx-{i}"), "status": "succeeded"})
                } else {
                    json!({"id": format!("tx-{i}"), "status": "succeeded"})
                }
            })
            .collect();
        return (
            200,
            if v1 {
                json!({"payments": items})
            } else {
                json!({"data": items})
            },
        );
    }
    if method != "POST" || !rest.is_empty() {
        return (404, json!({"error": "not found"}));
    }
    let id = format!(
        "tx-{}-{}",
        state.name,
        state.next_id.fetch_add(1, Ordering::SeqCst)
    );
    if v1 {
        let (Some(amount), Some(customer)) = (body.get("amount"), body.get("customer_id")) else {
            return (400, json!({"error": "v1 expects amount and customer_id"}));
        };
        (
            201,
            json!({"transaction_id": id, "status": "succeeded", "amount": amount,
                   "currency": body.get("currency"), "customer_id": customer}),
        )
    } else {
        let (Some(amount), Some(customer)) = (body.get("amount"), body.pointer("/customer/id"))
        else {
            return (
                400,
                json!({"error": "v2 expects amount.value and customer.id"}),
            );
        };
        (
            201,
            json!({"id": id, "status": "succeeded", "amount": amount,
                   "customer": {"id": customer}}),
        )
    }
}

/// `GET /events?n=N&interval_ms=M`: N server-sent events, M ms apart.
fn sse(q: &BTreeMap<String, String>) -> Response<Body> {
    let n: u64 = q.get("n").and_then(|v| v.parse().ok()).unwrap_or(5);
    let interval: u64 = q
        .get("interval_ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
    tokio::spawn(async move {
        for i in 0..n {
            let ev = format!("event: tick\ndata: {{\"n\": {i}}}\n\n");
            if tx.send(Ok(Frame::data(Bytes::from(ev)))).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(interval)).await;
        }
    });
    let stream = ReceiverStream::new(rx);
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("valid response")
}

/// A response that sends its headers and half its body, then fails the stream.
fn resetting(status: u16, bytes: Vec<u8>) -> Response<Body> {
    let half = Bytes::from(bytes[..bytes.len() / 2].to_vec());
    let total = bytes.len();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(2);
    tokio::spawn(async move {
        let _ = tx.send(Ok(Frame::data(half))).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = tx.send(Err(std::io::Error::other("reset requested"))).await;
    });
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("content-length", total.to_string())
        .body(BodyExt::boxed(StreamBody::new(ReceiverStream::new(rx))))
        .expect("valid response")
}
