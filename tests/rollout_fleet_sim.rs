//! A simulated fleet of 200 Envoys against a real etcd: each runs the very control flow the
//! wasm runs (`handoff::rollout::flow::Flow`, fed the wall clock, its own counts and etcd's
//! answers over the JSON gateway), publishing a window's counts with its lease; one of them,
//! elected with the leader key, sums and judges the fleet's window. Measured: the etcd
//! requests the fleet sends per window (counted here and cross-checked with etcd's own
//! /metrics), asserted O(N); one and only one judge per window; when the judge stops, another
//! takes over once its lease expires, and its counts expire with it.
//!
//! `HANDOFF_SIM_ENVOYS` sets the fleet size (default 200).
#![cfg(not(target_arch = "wasm32"))]

mod support;

use handoff::cohort::Variant;
use handoff::etcd::Answer;
use handoff::guard::{Guard, Window};
use handoff::rollout::flow::{Event, Flow, Local, Settings, Step};
use handoff::rollout::record;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use support::etcd::Etcd;

const PREFIX: &str = "/handoff/rollout/";
const SALT: &str = "sim-2026";
const WINDOW_S: u32 = 4;
const POLL_MS: u64 = 1000;
const LEASE_TTL_S: u64 = 4;
/// Per Envoy and window: far below `MIN_REQUESTS` alone, far above it summed.
const STABLE_PER_WINDOW: u64 = 10;
const CANARY_PER_WINDOW: u64 = 1;
const MIN_REQUESTS: u64 = 50;
const STEPS: [Step; 7] = [
    Step::Poll,
    Step::WriteAbort,
    Step::Grant,
    Step::Keepalive,
    Step::Publish,
    Step::Gather,
    Step::Judge,
];

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn guard() -> Guard {
    Guard {
        window_s: WINDOW_S,
        min_requests: MIN_REQUESTS,
        max_error_rate: 0.05,
        max_error_ratio: 2.0,
        latency: None,
        bad_windows: 2,
        admin: None,
    }
}

fn settings() -> Settings {
    Settings {
        prefix: PREFIX.to_string(),
        salt: SALT.to_string(),
        poll_ms: POLL_MS,
        // Generous for 200 reporters on a loaded machine (production default: 250 ms).
        timeout_ms: 2000,
        lease_ttl_s: LEASE_TTL_S,
        guard: Some(guard()),
    }
}

/// One Envoy's counts of a finished window: healthy traffic, a little of it canary.
fn counts() -> Window {
    let mut w = Window::default();
    for i in 0..STABLE_PER_WINDOW {
        w.cohort_mut(Variant::Stable)
            .record(20_000 + i * 100, false);
    }
    for _ in 0..CANARY_PER_WINDOW {
        w.cohort_mut(Variant::Canary).record(21_000, false);
    }
    w
}

/// What the fleet sent, by step, and what it saw.
#[derive(Default)]
struct Stats {
    sent: [AtomicU64; 7],
    failed: AtomicU64,
}

impl Stats {
    fn snapshot(&self) -> [u64; 7] {
        std::array::from_fn(|i| self.sent[i].load(Ordering::Relaxed))
    }
}

fn step_index(s: Step) -> usize {
    STEPS.iter().position(|x| *x == s).unwrap()
}

/// An event of one Envoy, when it happened.
struct Seen {
    envoy: usize,
    at_ms: u64,
    event: Event,
}

/// Drives one Envoy's flow until `stop`: whenever the flow has a request due, it is sent and
/// its answer fed back; otherwise the Envoy ticks again 50 ms later.
async fn envoy(
    i: usize,
    mut flow: Flow,
    client: reqwest::Client,
    base: String,
    stats: Arc<Stats>,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
) {
    let window = counts();
    while !stop.load(Ordering::Relaxed) {
        let now = now_ms();
        let local = Local {
            abort: None,
            counts: flow.counts_wanted(now).map(|w| (w, &window)),
        };
        let Some((step, request)) = flow.next(now, &local) else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        stats.sent[step_index(step)].fetch_add(1, Ordering::Relaxed);
        let answer = client
            .post(format!("{base}{}", request.path))
            .header("content-type", "application/json")
            .body(request.body)
            .send()
            .await;
        let (status, body) = match answer {
            Ok(r) => {
                let status = r.status().as_u16();
                match r.bytes().await {
                    Ok(b) => (Some(status), b.to_vec()),
                    Err(_) => (None, Vec::new()),
                }
            }
            Err(_) => (None, Vec::new()),
        };
        let events = flow.answer(
            now_ms(),
            &Answer {
                status,
                body: &body,
            },
            &local,
        );
        let mut seen = seen.lock().unwrap();
        for event in events {
            if matches!(event, Event::Failed(..)) {
                stats.failed.fetch_add(1, Ordering::Relaxed);
            }
            seen.push(Seen {
                envoy: i,
                at_ms: now_ms(),
                event,
            });
        }
    }
}

/// etcd's own count of the gRPC calls it started on its KV and Lease services (the JSON
/// gateway turns each HTTP request into one), and of the raft proposals it committed.
async fn etcd_counters(etcd: &Etcd) -> (f64, f64) {
    let text = support::h1()
        .get(etcd.metrics_url("/metrics"))
        .send()
        .await
        .expect("etcd /metrics")
        .text()
        .await
        .unwrap();
    let mut calls = 0.0;
    let mut proposals = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let value: f64 = value.parse().unwrap_or(0.0);
        if name.starts_with("grpc_server_started_total{")
            && (name.contains(r#"grpc_service="etcdserverpb.KV""#)
                || name.contains(r#"grpc_service="etcdserverpb.Lease""#))
        {
            calls += value;
        } else if name == "etcd_server_proposals_committed_total" {
            proposals = value;
        }
    }
    (calls, proposals)
}

/// Waits until `check` finds something in what the fleet saw (polling, up to `timeout`).
async fn wait_seen<T>(
    seen: &Mutex<Vec<Seen>>,
    what: &str,
    timeout: Duration,
    check: impl Fn(&[Seen]) -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check(&seen.lock().unwrap()) {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sleeps until the next window starts (windows are aligned on the clock).
async fn next_window_start() -> u64 {
    let w = u64::from(WINDOW_S) * 1000;
    let next = (now_ms() / w + 1) * w;
    tokio::time::sleep(Duration::from_millis(next - now_ms())).await;
    next / w
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_envoys_cost_o_n_and_elect_one_judge() {
    let n: usize = std::env::var("HANDOFF_SIM_ENVOYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let etcd = Etcd::start().await;
    let base = etcd.url("");
    let client = reqwest::Client::builder()
        .http1_only()
        .timeout(Duration::from_millis(settings().timeout_ms))
        .pool_max_idle_per_host(n + 8)
        .build()
        .unwrap();
    let stats = Arc::new(Stats::default());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let stops: Vec<Arc<AtomicBool>> = (0..n).map(|_| Arc::new(AtomicBool::new(false))).collect();
    let mut tasks = Vec::new();
    for (i, stop) in stops.iter().enumerate() {
        let id = format!("{:016x}", 0x5eed_0000_0000_0000u64 + i as u64);
        tasks.push(tokio::spawn(envoy(
            i,
            Flow::new(id, settings()),
            client.clone(),
            base.clone(),
            stats.clone(),
            seen.clone(),
            stop.clone(),
        )));
    }

    // The first fleet window judged: every Envoy's counts summed.
    let first = wait_seen(
        &seen,
        "the first fleet judgment",
        Duration::from_secs(30),
        |s| {
            s.iter().find_map(|e| match &e.event {
                Event::Judged(w) => Some(w.clone()),
                _ => None,
            })
        },
    )
    .await;
    assert_eq!(
        first.canary.requests,
        u64::from(first.envoys) * CANARY_PER_WINDOW,
        "the judge summed the Envoys' counts: {first:?}"
    );

    // Three whole windows, measured from 1 s into a window (between the publishes at its
    // start and the judgment 2 s in), so each step falls into the measure once per window.
    let windows = 3;
    let from_window = next_window_start().await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (sent_before, etcd_before) = (stats.snapshot(), etcd_counters(&etcd).await);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_millis(u64::from(WINDOW_S) * 1000 * windows)).await;
    let (sent_after, etcd_after) = (stats.snapshot(), etcd_counters(&etcd).await);
    let seconds = t0.elapsed().as_secs_f64();
    let by_step: Vec<(Step, u64)> = STEPS
        .iter()
        .enumerate()
        .map(|(i, s)| (*s, sent_after[i] - sent_before[i]))
        .collect();
    let total: u64 = by_step.iter().map(|(_, c)| c).sum();
    let per_window = total as f64 / windows as f64;
    let per_envoy_s = total as f64 / n as f64 / seconds;
    let etcd_calls = etcd_after.0 - etcd_before.0;
    let proposals = (etcd_after.1 - etcd_before.1) / windows as f64;
    println!("fleet of {n} Envoys, window {WINDOW_S} s, poll {POLL_MS} ms, lease TTL {LEASE_TTL_S} s, {windows} windows measured ({seconds:.1} s):");
    for (s, c) in &by_step {
        println!(
            "  {:<10} {:>6} requests ({:.2} per Envoy per window)",
            s.as_str(),
            c,
            *c as f64 / n as f64 / windows as f64
        );
    }
    println!(
        "  total      {total:>6} requests: {per_window:.0} per window ({:.2} x N), {per_envoy_s:.2} per Envoy per second, {:.0} per second in all",
        per_window / n as f64,
        total as f64 / seconds
    );
    println!("  etcd saw   {etcd_calls:>6.0} KV and Lease calls (grpc_server_started_total); {proposals:.0} raft proposals committed per window");
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    for e in seen.lock().unwrap().iter() {
        if let Event::Failed(step, error) = &e.event {
            *failures
                .entry(format!("{} {error}", step.as_str()))
                .or_default() += 1;
        }
    }
    println!(
        "  failed     {:>6} requests since the start: {failures:?}",
        stats.failed.load(Ordering::Relaxed)
    );

    // O(N): per Envoy and window, the polls (one per poll_ms), the lease renewals (one per
    // third of the TTL), one publish; the judge adds one range and one write for the fleet.
    let polls = (u64::from(WINDOW_S) * 1000 / POLL_MS) as f64;
    let renewals = u64::from(WINDOW_S) as f64 / (LEASE_TTL_S as f64 / 3.0);
    let bound = (polls + renewals + 1.0) * n as f64 + 2.0;
    assert!(
        per_window <= bound * 1.15,
        "{per_window:.0} requests per window for {n} Envoys, more than {bound:.0} (+15%)"
    );
    assert!(
        per_window >= bound * 0.5,
        "{per_window:.0} requests per window: the fleet is not running (expected about {bound:.0})"
    );
    let gathers = by_step[step_index(Step::Gather)].1;
    assert!(
        gathers <= windows + 1,
        "{gathers} counts ranges in {windows} windows: only the judge reads every Envoy's counts"
    );
    // etcd counts what the fleet sends (a request timed out by the sim may still count there).
    let diff = (etcd_calls - total as f64).abs();
    assert!(
        diff <= 0.05 * total as f64 + 10.0,
        "etcd saw {etcd_calls} calls, the fleet sent {total}"
    );

    // One and only one judge per window, so far.
    let judges = |s: &[Seen]| {
        let mut by_window: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for e in s {
            if let Event::Judged(w) = &e.event {
                by_window.entry(w.window).or_default().push(e.envoy);
            }
        }
        by_window
    };
    let before_kill = judges(&seen.lock().unwrap());
    for (w, by) in &before_kill {
        assert_eq!(by.len(), 1, "window {w} judged by {by:?}");
    }
    let judged: Vec<u64> = before_kill.keys().copied().collect();
    assert!(
        judged.contains(&(from_window)) && judged.contains(&(from_window + 1)),
        "the measured windows were judged: {judged:?}"
    );
    let leader = before_kill[&from_window][0];
    let envoys = |w: u64| -> Option<u32> {
        seen.lock().unwrap().iter().find_map(|e| match &e.event {
            Event::Judged(j) if j.window == w => Some(j.envoys),
            _ => None,
        })
    };
    // Every Envoy's counts summed: on a loaded machine a few publishes may land after the
    // judge's read (publishing comes after polls and renewals in the flow's order).
    let summed = envoys(from_window).unwrap();
    println!("  summed     {summed} of {n} Envoys' counts in window {from_window}");
    assert!(
        f64::from(summed) >= 0.95 * n as f64 && summed <= n as u32,
        "{summed} of {n} Envoys' counts summed"
    );

    // The judge stops (killed: its lease is neither renewed nor revoked).
    stops[leader].store(true, Ordering::Relaxed);
    let killed_ms = now_ms();
    let killed_window = killed_ms / (u64::from(WINDOW_S) * 1000);
    let (successor, took_ms) = wait_seen(
        &seen,
        "another judge",
        Duration::from_secs(LEASE_TTL_S + 20),
        |s| {
            s.iter().find_map(|e| match e.event {
                Event::Leader(true) if e.envoy != leader && e.at_ms >= killed_ms => {
                    Some((e.envoy, e.at_ms - killed_ms))
                }
                _ => None,
            })
        },
    )
    .await;
    println!("  takeover   envoy {successor} leads {took_ms} ms after the judge (envoy {leader}) stopped (lease TTL {LEASE_TTL_S} s, poll {POLL_MS} ms)");
    assert!(
        took_ms <= LEASE_TTL_S * 1000 + POLL_MS + 2000,
        "took {took_ms} ms: more than the lease TTL and a poll (+2 s)"
    );

    // The dead judge's counts expire with its lease; the new judge sums the others.
    let next = wait_seen(
        &seen,
        "a window judged by the new judge",
        Duration::from_secs(3 * u64::from(WINDOW_S) + 10),
        |s| {
            s.iter().find_map(|e| match &e.event {
                // A window that started after the stop: the dead Envoy has no counts for it.
                Event::Judged(w) if e.envoy == successor && w.window > killed_window => {
                    Some(w.clone())
                }
                _ => None,
            })
        },
    )
    .await;
    // The dead Envoy has no counts for a window after its stop; on a loaded machine a few
    // living Envoys' publishes may land after the judge's read.
    println!(
        "  after      the new judge summed {} of the {} living Envoys' counts in window {}",
        next.envoys,
        n - 1,
        next.window
    );
    assert!(
        next.envoys < n as u32 && f64::from(next.envoys) >= 0.95 * (n - 1) as f64,
        "the new judge sums the living Envoys: {next:?}"
    );
    let counts = record::counts_prefix(PREFIX, SALT);
    let expired = Duration::from_secs(LEASE_TTL_S + 10);
    support::wait_for("the dead Envoy's counts to expire", expired, || async {
        (etcd.count(&counts).await == n as u64 - 1).then_some(())
    })
    .await;
    for stop in &stops {
        stop.store(true, Ordering::Relaxed);
    }
    for t in tasks {
        t.await.unwrap();
    }
    for (w, by) in judges(&seen.lock().unwrap()) {
        assert_eq!(by.len(), 1, "window {w} judged by {by:?}");
        if w > killed_window {
            assert_eq!(by, [successor], "window {w} after the takeover");
        }
    }
}
