//! The rollout scenario: a real rollout under load, measured with handoff and with a
//! plain-Envoy baseline, reported in `bench/rollout.md`.
//!
//! Topology, all on loopback (`envoy/rollout-client.yaml`, `envoy/rollout-server.yaml`):
//! ```text
//! load (HTTP/1.1 + HTTP/2, N users) -> client Envoy (handoff canary [+ translate], retries,
//!     health checks, listener via file-based LDS) -> server Envoy A -> payments A
//!                                                  -> server Envoy B -> payments B
//!                                                  (both servers share one real etcd)
//! ```
//! Timeline during a fixed-rate load: steady at canary 0% -> LDS push 50% -> LDS push 100% ->
//! drain server A -> wait until nothing is in flight on A -> hard stop of server A's Envoy ->
//! bring it back -> steady until the end. The apps keep running across the stop so their
//! per-key execution counts stay complete (from the client's side a stopped sidecar is a
//! stopped pod).
//!
//! Profiles: `small` (default, part of `make test`, ~20 s per mode) and `full`
//! (`ROLLOUT_PROFILE=full`, `make rollout`, writes `bench/rollout.md`).
//!
//! In the handoff run the client Envoy runs canary and translate, the server Envoys run
//! idempotency (etcd store) and drain, the drain step uses handoff's admin endpoint and its
//! `inflight` count, and every POST must execute exactly once.
#![cfg(not(target_arch = "wasm32"))]

mod support;

use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::etcd::Etcd;
use support::lds::{gauge, gauge_or_zero, Lds, Push};
use support::{Backend, Envoy, EnvoyOpts};

#[derive(Debug, Clone, Copy)]
struct Profile {
    name: &'static str,
    /// Requests per second, all users together.
    rate: u32,
    users: usize,
    steady: Duration,
    /// Time at each ramp step (50%, 100%).
    step: Duration,
    /// Time server A stays stopped.
    stopped: Duration,
    /// Time after A is back.
    back: Duration,
}

const SMALL: Profile = Profile {
    name: "small",
    rate: 40,
    users: 20,
    steady: Duration::from_secs(3),
    step: Duration::from_secs(3),
    stopped: Duration::from_secs(2),
    back: Duration::from_secs(3),
};

const FULL: Profile = Profile {
    name: "full",
    rate: 200,
    users: 100,
    steady: Duration::from_secs(15),
    step: Duration::from_secs(15),
    stopped: Duration::from_secs(10),
    back: Duration::from_secs(15),
};

fn profile() -> Profile {
    match std::env::var("ROLLOUT_PROFILE").as_deref() {
        Ok("full") => FULL,
        _ => SMALL,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Handoff,
    Baseline,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Handoff => "handoff",
            Mode::Baseline => "baseline (plain Envoy)",
        }
    }
}

/// The phase of the timeline a request was sent in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
enum Phase {
    Steady = 0,
    Ramp50 = 1,
    Ramp100 = 2,
    Draining = 3,
    Stopped = 4,
    Back = 5,
}

const PHASES: [Phase; 6] = [
    Phase::Steady,
    Phase::Ramp50,
    Phase::Ramp100,
    Phase::Draining,
    Phase::Stopped,
    Phase::Back,
];

impl Phase {
    fn from_u8(v: u8) -> Phase {
        PHASES[usize::from(v).min(PHASES.len() - 1)]
    }
    fn label(self) -> &'static str {
        match self {
            Phase::Steady => "steady (0%)",
            Phase::Ramp50 => "ramp 50%",
            Phase::Ramp100 => "ramp 100%",
            Phase::Draining => "draining A",
            Phase::Stopped => "A stopped",
            Phase::Back => "A back",
        }
    }
}

const SALT: &str = "rollout-2026-11";

/// The client Envoy's handoff configuration at `percent`.
fn client_config(percent: f64) -> Value {
    json!({
        "canary": {
            "salt": SALT,
            "percent": percent,
            "user_id": [{"header": "x-user-id"}],
            "response_header": true
        },
        // The translate contract's payments route following the cohort; the load also sends
        // v1 payments.
        "translate": {"routes": [{
            "name": "payments",
            "v1_prefix": "/api/v1/payments",
            "v2_prefix": "/api/v2/payments",
            "backend": {"stable": "v1", "canary": "v2"},
            "request": [
                {"v1": "/amount", "v2": "/amount/value"},
                {"v1": "/currency", "v2": "/amount/currency"},
                {"v1": "/customer_id", "v2": "/customer/id", "required": true}
            ],
            "response": [
                {"v1": "/transaction_id", "v2": "/id"},
                {"v1": "/status", "v2": "/status"}
            ]
        }]}
    })
}

const DRAIN_PATH: &str = "/.well-known/handoff/drain";

/// The baseline's drain time between `/healthcheck/fail` and the hard stop.
const PLAIN_DRAIN: Duration = Duration::from_secs(1);

/// Every `SLOW_EVERY`-th POST takes `SLOW_MS` in the app (a payment that waits on a bank): work
/// that is still running when a server is stopped.
const SLOW_EVERY: u64 = 5;
const SLOW_MS: u64 = 1500;

/// A server Envoy's handoff configuration.
fn server_config() -> Value {
    json!({
        "idempotency": {
            "methods": ["POST"],
            "required": false,
            "scope": [{"header": "x-user-id"}],
            "store": {"type": "etcd", "cluster": "etcd", "authority": "etcd",
                      "prefix": "/handoff/idem/", "timeout_ms": 250, "on_error": "reject"}
        },
        "drain": {
            "admin": {"path": DRAIN_PATH},
            "envoy_admin": {"cluster": "envoy_admin"},
            "grace_s": 2,
            "reconnect_jitter_ms": 1000,
            "retry_after_s": 1
        }
    })
}

/// The baseline's route: Envoy's weighted clusters at `percent` (random per request), with a
/// response header naming the cluster so the load can see the variant.
fn baseline_routes(percent: u32) -> Value {
    let entry = |name: &str, weight: u32| {
        json!({"name": name, "weight": weight,
               "response_headers_to_add": [{"header": {"key": "x-canary-variant", "value": name}}]})
    };
    json!([{
        "match": {"prefix": "/"},
        "route": {"timeout": "10s", "weighted_clusters": {"clusters": [
            entry("stable", 100 - percent), entry("canary", percent)
        ]}}
    }])
}

fn remove_handoff(cfg: &mut Value) {
    if let Some(listeners) = cfg
        .pointer_mut("/static_resources/listeners")
        .and_then(Value::as_array_mut)
    {
        for l in listeners {
            if let Some(filters) = l
                .pointer_mut("/filter_chains/0/filters/0/typed_config/http_filters")
                .and_then(Value::as_array_mut)
            {
                filters.retain(|f| f["name"] != "handoff");
            }
        }
    }
}

fn set_routes(listener: &mut Value, routes: Value) {
    listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"]
        [0]["routes"] = routes;
}

struct Topology {
    mode: Mode,
    etcd: Etcd,
    apps: [Backend; 2],
    servers: [Option<Envoy>; 2],
    server_ports: [u16; 2],
    client: Envoy,
    lds: Lds,
}

async fn start_server(mode: Mode, app: &Backend, etcd: &Etcd, port: Option<u16>) -> Envoy {
    let mut opts = EnvoyOpts::new("rollout-server")
        .upstream(8081, app)
        .port(2379, etcd.client_port);
    if let Some(p) = port {
        opts = opts.port(10000, p);
    }
    opts = match mode {
        Mode::Handoff => opts.plugin_config(server_config()),
        Mode::Baseline => opts.edit(remove_handoff),
    };
    Envoy::start(opts).await
}

impl Topology {
    async fn start(mode: Mode) -> Topology {
        let etcd = Etcd::start().await;
        let apps = [Backend::start("a", "v2"), Backend::start("b", "v2")];
        let a = start_server(mode, &apps[0], &etcd, None).await;
        let b = start_server(mode, &apps[1], &etcd, None).await;
        let server_ports = [a.port(10000), b.port(10000)];
        let lds = Lds::new();
        let mut opts = EnvoyOpts::new("rollout-client")
            .port(10001, server_ports[0])
            .port(10002, server_ports[1])
            // Connections of a replaced listener are asked to close at their next response
            // (immediate strategy), and closed for good after the drain time, which must be
            // longer than the slowest request: with 1 s, the LDS pushes cut the slow POSTs in
            // flight on the old listener (seen: 4 client-visible failures per run).
            .arg("--drain-strategy")
            .arg("immediate")
            .arg("--drain-time-s")
            .arg("5");
        opts = match mode {
            Mode::Handoff => opts.plugin_config(client_config(0.0)),
            Mode::Baseline => opts.edit(|cfg| {
                remove_handoff(cfg);
                if let Some(l) = cfg.pointer_mut("/static_resources/listeners/0") {
                    set_routes(l, baseline_routes(0));
                }
            }),
        };
        let client = Envoy::start(lds.setup(opts)).await;
        let t = Topology {
            mode,
            etcd,
            apps,
            servers: [Some(a), Some(b)],
            server_ports,
            client,
            lds,
        };
        t.wait_healthy(2).await;
        t
    }

    /// Waits until the client Envoy sees `n` healthy servers in both clusters.
    async fn wait_healthy(&self, n: u64) {
        support::wait_for(
            &format!("{n} healthy servers in the client's clusters"),
            Duration::from_secs(30),
            || async {
                let s = gauge(&self.client, "cluster.stable.membership_healthy").await;
                let c = gauge(&self.client, "cluster.canary.membership_healthy").await;
                (s == n && c == n).then_some(())
            },
        )
        .await;
    }

    async fn ramp(&self, percent: u32) {
        let outcome = match self.mode {
            Mode::Handoff => {
                self.lds
                    .push_plugin_config(&self.client, client_config(percent.into()))
                    .await
            }
            Mode::Baseline => {
                let mut listeners = self.lds.listeners();
                set_routes(&mut listeners[0], baseline_routes(percent));
                self.lds.push(&self.client, listeners).await
            }
        };
        assert_eq!(outcome, Push::Accepted, "ramp to {percent}%");
    }

    /// Starts the drain of server A and waits until nothing is in flight there and the client
    /// no longer picks it.
    async fn drain_a(&self) {
        let a = self.servers[0].as_ref().expect("A runs");
        let client = support::h1();
        if self.mode == Mode::Handoff {
            let r = client
                .post(a.url(DRAIN_PATH))
                .send()
                .await
                .expect("drain admin");
            assert!(r.status().is_success(), "drain start: {}", r.status());
            support::wait_for("inflight 0 on A", Duration::from_secs(60), || async {
                let v: Value = client
                    .get(a.url(DRAIN_PATH))
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                (v["inflight"] == 0 && v["state"] != "serving").then_some(())
            })
            .await;
            self.wait_healthy(1).await;
        } else {
            // Plain Envoy: fail the health checks, then give connections a fixed drain time
            // (Istio's terminationDrainDuration) before the stop. Plain Envoy has no signal for
            // the app's work in flight, so none is waited for.
            let r = client
                .post(a.admin_url("/healthcheck/fail"))
                .send()
                .await
                .expect("admin");
            assert!(r.status().is_success());
            tokio::time::sleep(PLAIN_DRAIN).await;
        }
    }

    /// Hard stop of server A's Envoy (SIGKILL).
    fn stop_a(&mut self) {
        if let Some(mut a) = self.servers[0].take() {
            a.stop();
        }
    }

    async fn bring_back_a(&mut self) {
        let a = start_server(
            self.mode,
            &self.apps[0],
            &self.etcd,
            Some(self.server_ports[0]),
        )
        .await;
        self.servers[0] = Some(a);
        self.wait_healthy(2).await;
    }
}

#[derive(Debug, Clone)]
struct Sample {
    user: usize,
    sent: Duration,
    latency: Duration,
    phase: Phase,
    status: Option<u16>,
    error: Option<String>,
    variant: String,
    post_key: Option<String>,
    /// A deliberately slow POST (excluded from the latency figures).
    slow: bool,
}

impl Sample {
    fn failed(&self) -> bool {
        !matches!(self.status, Some(s) if (200..300).contains(&s))
    }
}

/// Runs the load until `stop` is set: each user sends sequentially at `rate / users` per
/// second, alternating GET and POST (each POST with a unique idempotency key); odd users speak
/// HTTP/2, even ones HTTP/1.1.
fn start_load(
    client_url: String,
    profile: Profile,
    mode: Mode,
    phase: Arc<AtomicU8>,
    stop: Arc<AtomicU8>,
) -> tokio::task::JoinHandle<Vec<Sample>> {
    tokio::spawn(async move {
        let start = Instant::now();
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (h1, h2) = (support::h1(), support::h2());
        let period = Duration::from_secs_f64(profile.users as f64 / f64::from(profile.rate));
        let mut tasks = Vec::new();
        for user in 0..profile.users {
            let client = if user % 2 == 1 {
                h2.clone()
            } else {
                h1.clone()
            };
            let (url, phase, stop, samples) = (
                client_url.clone(),
                phase.clone(),
                stop.clone(),
                samples.clone(),
            );
            tasks.push(tokio::spawn(async move {
                // Spread the users' first requests over one period.
                let offset = period.mul_f64(user as f64 / profile.users as f64);
                let mut tick =
                    tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut i = 0u64;
                while stop.load(Ordering::SeqCst) == 0 {
                    tick.tick().await;
                    i += 1;
                    let post = i % 2 == 0;
                    let key = format!(
                        "k-{}-{user}-{i}",
                        if mode == Mode::Handoff { "h" } else { "b" }
                    );
                    // Staggered per user, so slow work is always in flight somewhere.
                    let is_slow = post && (user as u64 + i / 2) % SLOW_EVERY == 0;
                    let slow = if is_slow {
                        format!("?delay_ms={SLOW_MS}")
                    } else {
                        String::new()
                    };
                    let req = if post {
                        client
                            .post(format!("{url}/orders{slow}"))
                            .header("idempotency-key", key.as_str())
                            .header("content-type", "application/json")
                            .body(format!(r#"{{"user": {user}, "n": {i}}}"#))
                    } else {
                        client.get(format!("{url}/orders?user={user}"))
                    };
                    let sent = start.elapsed();
                    let ph = Phase::from_u8(phase.load(Ordering::SeqCst));
                    let t0 = Instant::now();
                    let res = req.header("x-user-id", format!("user-{user}")).send().await;
                    let (status, error, variant) = match res {
                        Ok(r) => {
                            let variant = r
                                .headers()
                                .get("x-canary-variant")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string();
                            let status = r.status().as_u16();
                            let body = r.bytes().await;
                            (Some(status), body.err().map(|e| e.to_string()), variant)
                        }
                        Err(e) => (None, Some(e.to_string()), String::new()),
                    };
                    samples.lock().unwrap().push(Sample {
                        user,
                        sent,
                        latency: t0.elapsed(),
                        phase: ph,
                        status,
                        error,
                        variant,
                        post_key: post.then_some(key),
                        slow: is_slow,
                    });
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let out = samples.lock().unwrap().clone();
        out
    })
}

#[derive(Debug, Default, Clone)]
struct Outcome {
    label: String,
    requests: usize,
    h2_requests: usize,
    failures: usize,
    failure_examples: Vec<String>,
    posts: usize,
    exec_once: usize,
    exec_never: usize,
    exec_twice_or_more: usize,
    p99_steady_ms: f64,
    p99_drain_ms: f64,
    p99_by_phase: Vec<(Phase, usize, f64)>,
    flipped_back_users: usize,
    duration_s: f64,
    /// The client Envoy's retry and reset counters, summed over both clusters.
    client_stats: Vec<(String, u64)>,
}

/// Client-side counters that explain failures and duplicates.
const CLIENT_STATS: [&str; 6] = [
    "upstream_rq_retry",
    "upstream_rq_retry_success",
    "upstream_rq_retry_overflow",
    "upstream_rq_retry_limit_exceeded",
    "upstream_cx_destroy_remote_with_active_rq",
    "upstream_rq_503",
];

fn p99(mut v: Vec<Duration>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort();
    let i = ((v.len() as f64) * 0.99).ceil() as usize - 1;
    v[i.min(v.len() - 1)].as_secs_f64() * 1000.0
}

async fn run(mode: Mode, profile: Profile) -> Outcome {
    let mut topo = Topology::start(mode).await;
    let phase = Arc::new(AtomicU8::new(Phase::Steady as u8));
    let stop = Arc::new(AtomicU8::new(0));
    let started = Instant::now();
    let load = start_load(
        topo.client.url(""),
        profile,
        mode,
        phase.clone(),
        stop.clone(),
    );
    let set = |p: Phase| phase.store(p as u8, Ordering::SeqCst);

    // The timeline. Sleeps here pace the scenario (how long each phase lasts under load); no
    // assertion depends on them, every transition waits on its own condition.
    tokio::time::sleep(profile.steady).await;
    topo.ramp(50).await;
    set(Phase::Ramp50);
    tokio::time::sleep(profile.step).await;
    topo.ramp(100).await;
    set(Phase::Ramp100);
    tokio::time::sleep(profile.step).await;
    set(Phase::Draining);
    topo.drain_a().await;
    topo.stop_a();
    set(Phase::Stopped);
    tokio::time::sleep(profile.stopped).await;
    topo.bring_back_a().await;
    set(Phase::Back);
    tokio::time::sleep(profile.back).await;
    stop.store(1, Ordering::SeqCst);
    let samples = load.await.expect("load task");
    let duration_s = started.elapsed().as_secs_f64();

    // Executions per key, from both apps (they ran throughout).
    let mut executions: BTreeMap<String, u64> = BTreeMap::new();
    for app in &topo.apps {
        for (k, n) in app.executions().await {
            *executions.entry(k).or_default() += n;
        }
    }
    let mut out = Outcome {
        label: mode.label().to_string(),
        requests: samples.len(),
        h2_requests: samples.iter().filter(|s| s.user % 2 == 1).count(),
        duration_s,
        ..Outcome::default()
    };
    for s in samples.iter().filter(|s| s.failed()) {
        out.failures += 1;
        if out.failure_examples.len() < 5 {
            out.failure_examples.push(format!(
                "{} at {:.1}s ({}): {}",
                if s.post_key.is_some() { "POST" } else { "GET" },
                s.sent.as_secs_f64(),
                s.phase.label(),
                s.status
                    .map(|c| c.to_string())
                    .or(s.error.clone())
                    .unwrap_or_default()
            ));
        }
    }
    for s in samples.iter().filter_map(|s| s.post_key.as_ref()) {
        out.posts += 1;
        match executions.get(s).copied().unwrap_or(0) {
            0 => out.exec_never += 1,
            1 => out.exec_once += 1,
            _ => out.exec_twice_or_more += 1,
        }
    }
    let lat = |p: Phase| -> Vec<Duration> {
        samples
            .iter()
            .filter(|s| s.phase == p && !s.slow)
            .map(|s| s.latency)
            .collect()
    };
    out.p99_steady_ms = p99(lat(Phase::Steady));
    out.p99_drain_ms = p99(lat(Phase::Draining));
    out.p99_by_phase = PHASES
        .iter()
        .map(|&p| (p, lat(p).len(), p99(lat(p))))
        .collect();
    // Users whose variant went from canary back to stable (in send order; each user's
    // requests are sequential).
    let mut by_user: HashMap<usize, Vec<&Sample>> = HashMap::new();
    for s in &samples {
        by_user.entry(s.user).or_default().push(s);
    }
    for seq in by_user.values_mut() {
        seq.sort_by_key(|s| s.sent);
        let mut seen_canary = false;
        let mut flipped = false;
        for s in seq.iter().filter(|s| !s.variant.is_empty()) {
            if s.variant == "canary" {
                seen_canary = true;
            } else if seen_canary && s.variant == "stable" {
                flipped = true;
            }
        }
        out.flipped_back_users += usize::from(flipped);
    }
    for name in CLIENT_STATS {
        let mut total = 0;
        for cluster in ["stable", "canary"] {
            // `upstream_rq_503` exists only once a 503 happened.
            total += gauge_or_zero(&topo.client, &format!("cluster.{cluster}.{name}")).await;
        }
        out.client_stats.push((name.to_string(), total));
    }
    drop(topo);
    out
}

fn report(profile: Profile, runs: &[Outcome]) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Rollout under load: handoff vs. plain Envoy\n");
    let _ = writeln!(
        md,
        "Generated by `{}` (profile `{}`: {} req/s from {} users, half HTTP/1.1 and half \
         HTTP/2, GET and POST alternating, every POST with a unique `Idempotency-Key`). \
         Topology and timeline: `tests/rollout.rs`.\n",
        if profile.name == "full" {
            "make rollout"
        } else {
            "cargo test --test rollout"
        },
        profile.name,
        profile.rate,
        profile.users,
    );
    let _ = write!(md, "| | ");
    let _ = writeln!(
        md,
        "{} |",
        runs.iter()
            .map(|r| r.label.as_str())
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(md, "|---|{}", "---|".repeat(runs.len()));
    let row = |md: &mut String, name: &str, f: &dyn Fn(&Outcome) -> String| {
        let _ = writeln!(
            md,
            "| {name} | {} |",
            runs.iter().map(f).collect::<Vec<_>>().join(" | ")
        );
    };
    row(&mut md, "requests sent", &|r| {
        format!(
            "{} ({} over HTTP/2), {:.0} s",
            r.requests, r.h2_requests, r.duration_s
        )
    });
    row(&mut md, "client-visible failures (target 0)", &|r| {
        r.failures.to_string()
    });
    row(&mut md, "POSTs executed exactly once (target all)", &|r| {
        format!("{} of {}", r.exec_once, r.posts)
    });
    row(&mut md, "POSTs executed twice or more (target 0)", &|r| {
        r.exec_twice_or_more.to_string()
    });
    row(&mut md, "POSTs never executed", &|r| {
        r.exec_never.to_string()
    });
    row(&mut md, "p99 latency, steady", &|r| {
        format!("{:.1} ms", r.p99_steady_ms)
    });
    row(&mut md, "p99 latency, during the drain of A", &|r| {
        format!("{:.1} ms", r.p99_drain_ms)
    });
    row(
        &mut md,
        "users whose variant flipped back (target 0)",
        &|r| r.flipped_back_users.to_string(),
    );
    let _ = writeln!(md, "\n## p99 latency by phase (requests, p99)\n");
    let _ = writeln!(
        md,
        "| phase | {} |",
        runs.iter()
            .map(|r| r.label.as_str())
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(md, "|---|{}", "---|".repeat(runs.len()));
    for (i, p) in PHASES.iter().enumerate() {
        let _ = writeln!(
            md,
            "| {} | {} |",
            p.label(),
            runs.iter()
                .map(|r| {
                    let (_, n, v) = r.p99_by_phase[i];
                    format!("{n}, {v:.1} ms")
                })
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    let _ = writeln!(md, "\n## Client Envoy counters (both clusters)\n");
    let _ = writeln!(
        md,
        "| counter | {} |",
        runs.iter()
            .map(|r| r.label.as_str())
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(md, "|---|{}", "---|".repeat(runs.len()));
    for (i, name) in CLIENT_STATS.iter().enumerate() {
        let _ = writeln!(
            md,
            "| `{name}` | {} |",
            runs.iter()
                .map(|r| r
                    .client_stats
                    .get(i)
                    .map(|(_, v)| v.to_string())
                    .unwrap_or_default())
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    for r in runs {
        if !r.failure_examples.is_empty() {
            let _ = writeln!(md, "\nFirst failures, {}:\n", r.label);
            for f in &r.failure_examples {
                let _ = writeln!(md, "- {f}");
            }
        }
    }
    let _ = writeln!(
        md,
        "\nEvery {SLOW_EVERY}th POST takes {SLOW_MS} ms in the app (left out of the latency \
         figures, which are for the other requests). How each run drains \
         server A: handoff: `POST /.well-known/handoff/drain`, wait for `inflight` 0, hard \
         stop. Baseline: `POST /healthcheck/fail` on A's admin port, {} s of drain \
         time (as Istio's terminationDrainDuration), then a hard stop (SIGKILL) of A's Envoy; \
         the client Envoy retries resets and 503s on the other server. The baseline's ramp is \
         Envoy's `weighted_clusters` (random per request), pushed through the same file-based \
         LDS.",
        PLAIN_DRAIN.as_secs()
    );
    md.push_str(NOTES);
    md
}

/// What earlier runs of this scenario taught (kept in the report, since the fixtures changed
/// because of them).
const NOTES: &str = "
## Notes

- In the baseline, the hard stop of a server resets the requests it still had in flight; the
  client Envoy retries them on the other server (the `reset` retry), so the client sees no
  error but a POST already executed by A's app runs a second time on B: the `executed twice
  or more` row, equal to `upstream_rq_retry_success`. handoff's drain (wait for `inflight` 0
  before the stop) and idempotency (a shared etcd store, so a retry on B of an operation A
  completed is replayed) are the two fixes.
- Envoy allows 3 concurrent retries per cluster by default (`circuit_breakers.max_retries`).
  A stopped server resets all its in-flight requests at once, and the retries beyond 3 reached
  the clients as 503s (a first full run: 7 and 8 client-visible failures,
  `upstream_rq_retry_overflow` 7 and 8). `envoy/rollout-client.yaml` raises the limit to 100.
- A listener update (the LDS pushes of the ramp) drains the old listener's connections; when
  `--drain-time-s` ends, requests still in flight on them are cut. With 1 s and 1.5 s POSTs a
  small run had 4 client-visible failures; the scenario runs the client Envoy with 5 s. Keep
  the drain time above your slowest request.
- The baseline's ramp (`weighted_clusters`) picks a cluster per request, so every user whose
  requests spanned the ramp saw both versions; handoff's cohorts only ever move users from
  stable to canary.
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_under_load() {
    let profile = profile();
    let handoff = run(Mode::Handoff, profile).await;
    let baseline = run(Mode::Baseline, profile).await;
    let md = report(profile, &[handoff.clone(), baseline.clone()]);
    let path = if profile.name == "full" {
        support::root().join("bench/rollout.md")
    } else {
        support::root().join("bench/out/rollout-small.md")
    };
    std::fs::create_dir_all(path.parent().expect("dir")).expect("bench dir");
    std::fs::write(&path, &md).expect("write report");
    eprintln!("{md}\n(written to {})", path.display());

    assert!(handoff.requests > 0 && baseline.requests > 0);
    assert_eq!(
        handoff.flipped_back_users, 0,
        "a user went back from canary to stable during handoff's ramp"
    );
    assert_eq!(handoff.exec_twice_or_more, 0, "a POST executed twice");
    // The headline promise: drain and idempotency together, no client-visible failure.
    assert_eq!(handoff.failures, 0, "{:?}", handoff.failure_examples);
}
