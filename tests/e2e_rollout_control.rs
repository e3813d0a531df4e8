//! Fleet-wide rollout control end to end: one real etcd, THREE client-side Envoys
//! (`envoy/rollout-client.yaml`, the route following the cohort header) in front of a stable
//! and a canary `payments` upstream, and the real `handoffctl rollout`.
//! - `abort`: every Envoy routes every user to stable within poll_ms + 1 s; `resume`: the
//!   cohorts of 2,000 users are exactly as before through all three;
//! - `set-percent 30`: 30% ± 1.5 points of 10,000 ids are canary through each Envoy, no user
//!   moves canary -> stable, and no Envoy got a configuration push;
//! - etcd frozen (SIGSTOP) then killed: requests keep flowing with the last state (p99 with
//!   and without the outage printed); etcd restarted: an abort after the restart takes effect;
//! - low traffic per Envoy: each Envoy's canary stays below min_requests per window, the
//!   fleet's sum does not; a canary answering 503 is aborted fleet-wide by the fleet
//!   judgment. The judge is killed in the middle: another Envoy takes the leader key within
//!   a lease TTL, the dead Envoy's counts key expires, and the new judge aborts;
//! - etcd requests per Envoy per second, from etcd's own gRPC counters and from the Envoys'
//!   metrics, printed.
#![cfg(not(target_arch = "wasm32"))]

mod support;

use futures::StreamExt;
use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use support::etcd::Etcd;
use support::{cohort, h1, Backend, Envoy, EnvoyOpts};

const SALT: &str = "fleet-2026-12";
const PREFIX: &str = "/handoff/rollout/";
const POLL_MS: u64 = 500;
const LEASE_TTL_S: u64 = 3;
const WINDOW_S: u64 = 2;
const MIN_REQUESTS: u64 = 30;
const PERCENT: f64 = 10.0;
/// Three in a row: time enough to kill the judge between the first bad window and the abort.
const BAD_WINDOWS: u64 = 3;

fn plugin_config() -> Value {
    json!({"canary": {
        "salt": SALT,
        "percent": PERCENT,
        "user_id": [{"header": "x-user-id"}],
        "response_header": true,
        "guard": {"window_s": WINDOW_S, "min_requests": MIN_REQUESTS, "bad_windows": BAD_WINDOWS},
        "control": {"etcd": {"cluster": "etcd", "authority": "etcd", "prefix": PREFIX,
            "poll_ms": POLL_MS, "timeout_ms": 400, "lease_ttl_s": LEASE_TTL_S}}
    }})
}

/// A client Envoy whose `stable` cluster is the stable upstream and `canary` the canary one
/// (the fixture spreads both over two servers), without retries (each request counts once).
async fn client_envoy(etcd: &Etcd, stable: &Backend, canary: &Backend) -> Envoy {
    let (s, c) = (stable.addr.port(), canary.addr.port());
    let opts = EnvoyOpts::new("rollout-client")
        .port(10001, s)
        .port(10002, c)
        .port(2379, etcd.client_port)
        .plugin_config(plugin_config())
        .edit(move |cfg| {
            for cluster in cfg["static_resources"]["clusters"].as_array_mut().unwrap() {
                let keep = match cluster["name"].as_str() {
                    Some("stable") => s,
                    Some("canary") => c,
                    _ => continue,
                };
                let eps = cluster
                    .pointer_mut("/load_assignment/endpoints/0/lb_endpoints")
                    .and_then(Value::as_array_mut)
                    .unwrap();
                eps.retain(|e| e.pointer("/endpoint/address/socket_address/port_value") == Some(&json!(keep)));
            }
            let vh = cfg
                .pointer_mut("/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/route_config/virtual_hosts/0")
                .and_then(Value::as_object_mut)
                .unwrap();
            vh.remove("retry_policy");
        });
    Envoy::start(opts).await
}

/// `handoffctl rollout ARGS --etcd URL --salt SALT`; panics with its stderr unless it exits 0.
/// A write that lost its compare-and-swap (exit 4: the judge writes each fleet window into
/// the record) is run again, as an operator would after `status`.
fn handoffctl(etcd: &Etcd, args: &[&str]) -> String {
    for _ in 0..5 {
        let out = Command::new(env!("CARGO_BIN_EXE_handoffctl"))
            .arg("rollout")
            .args(args)
            .args(["--etcd", &etcd.url(""), "--salt", SALT, "--prefix", PREFIX])
            .output()
            .expect("handoffctl runs");
        if out.status.code() == Some(4) {
            continue;
        }
        assert!(
            out.status.success(),
            "handoffctl rollout {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return String::from_utf8_lossy(&out.stdout).into_owned();
    }
    panic!("handoffctl rollout {args:?} lost its compare-and-swap five times in a row");
}

/// The rollout record as stored (through the JSON gateway).
async fn record(etcd: &Etcd) -> Option<Value> {
    let key = handoff::rollout::record::record_key(PREFIX, SALT);
    get(etcd, &key)
        .await
        .map(|v| serde_json::from_slice(&v).expect("record JSON"))
}

/// The value of `key`; `None` when absent or when etcd did not answer.
async fn get(etcd: &Etcd, key: &str) -> Option<Vec<u8>> {
    etcd.values(key, false).await?.into_iter().next()
}

/// Every Envoy's published counts: (window, canary requests) per counts key.
async fn published_counts(etcd: &Etcd) -> Vec<(u64, u64)> {
    let prefix = handoff::rollout::record::counts_prefix(PREFIX, SALT);
    etcd.values(&prefix, true)
        .await
        .expect("etcd reachable")
        .iter()
        .filter_map(|b| {
            let (w, counts) = handoff::rollout::record::decode_counts(b)?;
            Some((w, counts.canary.requests))
        })
        .collect()
}

/// The variant one request of `user` got through `envoy`, checked against the upstream that
/// answered (the route followed the cohort).
async fn variant(client: &reqwest::Client, envoy: &Envoy, user: &str) -> Result<String, String> {
    let r = client
        .get(envoy.url("/ping"))
        .header("x-user-id", user)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let h = |n: &str| {
        r.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let (v, upstream) = (h("x-canary-variant"), h("x-upstream"));
    if v != upstream {
        return Err(format!(
            "{user}: variant {v:?} answered by {upstream:?} ({})",
            r.status()
        ));
    }
    Ok(v)
}

/// The variant of each user through `envoy`, in order (32 requests at a time).
async fn cohorts(client: &reqwest::Client, envoy: &Envoy, users: &[String]) -> Vec<String> {
    futures::stream::iter(users)
        .map(|u| variant(client, envoy, u))
        .buffered(32)
        .map(|r| r.expect("request through Envoy"))
        .collect()
        .await
}

fn users(n: usize, prefix: &str) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// Waits until every Envoy gives every probe user the variant `want(user)`; the time taken.
async fn until_all(
    what: &str,
    client: &reqwest::Client,
    envoys: &[&Envoy],
    probes: &[String],
    want: impl Fn(&str) -> &'static str,
    timeout: Duration,
) -> Duration {
    let start = Instant::now();
    loop {
        let mut ok = true;
        for e in envoys {
            let got = cohorts(client, e, probes).await;
            ok &= got.iter().zip(probes).all(|(g, u)| g == want(u));
        }
        if ok {
            return start.elapsed();
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn stat(envoy: &Envoy, name: &str) -> f64 {
    envoy.stats().await.sum_or_zero(name)
}

/// etcd's own count of the KV and lease calls it started (the gateway's included).
async fn etcd_calls(etcd: &Etcd) -> f64 {
    let text = h1()
        .get(etcd.url("/metrics"))
        .send()
        .await
        .expect("etcd metrics")
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("grpc_server_started_total{"))
        .filter(|l| l.contains("etcdserverpb.KV") || l.contains("etcdserverpb.Lease"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

async fn rollout_requests(envoy: &Envoy) -> f64 {
    let s = envoy.stats().await;
    [
        "handoff_rollout_etcd_reads",
        "handoff_rollout_etcd_writes",
        "handoff_rollout_etcd_lease_calls",
    ]
    .iter()
    .map(|n| s.sum_or_zero(n))
    .sum()
}

/// Latency of `n` requests spread over the Envoys (4 at a time): all must succeed.
async fn latencies(client: &reqwest::Client, envoys: &[&Envoy], n: usize) -> Vec<Duration> {
    let mut out: Vec<Duration> = futures::stream::iter(0..n)
        .map(|i| async move {
            let e = envoys[i % envoys.len()];
            let start = Instant::now();
            variant(client, e, &format!("lat-{i}"))
                .await
                .expect("request during the test");
            start.elapsed()
        })
        .buffer_unordered(4)
        .collect()
        .await;
    out.sort();
    out
}

fn p99(sorted: &[Duration]) -> Duration {
    sorted[(sorted.len() * 99).div_ceil(100) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_record_moves_three_envoys() {
    let test_start = Instant::now();
    let mut etcd = Etcd::start().await;
    let stable = Backend::start("stable", "v2");
    let canary = Backend::start("canary", "v2");
    let mut envoys = [
        client_envoy(&etcd, &stable, &canary).await,
        client_envoy(&etcd, &stable, &canary).await,
        client_envoy(&etcd, &stable, &canary).await,
    ];
    let client = h1();
    let calls_at_start = (etcd_calls(&etcd).await, Instant::now());
    let all: Vec<&Envoy> = envoys.iter().collect();

    // The cohorts before any control: the configured percent, the same through every Envoy.
    let people = users(2000, "user-");
    let before = cohorts(&client, all[0], &people).await;
    for (u, v) in people.iter().zip(&before) {
        assert_eq!(v, cohort(SALT, u, PERCENT), "{u}");
    }
    for e in &all[1..] {
        assert_eq!(cohorts(&client, e, &people).await, before);
    }
    let canary_users: Vec<String> = people
        .iter()
        .zip(&before)
        .filter(|(_, v)| *v == "canary")
        .map(|(u, _)| u.clone())
        .collect();
    let probes: Vec<String> = canary_users.iter().take(20).cloned().collect();

    // Abort: everyone to stable within poll_ms + 1 s (measured; asserted with slack).
    handoffctl(&etcd, &["abort", "--reason", "e2e"]);
    let took = until_all(
        "the abort",
        &client,
        &all,
        &probes,
        |_| "stable",
        Duration::from_secs(15),
    )
    .await;
    println!(
        "abort reached all three Envoys in {} ms (poll_ms {POLL_MS})",
        took.as_millis()
    );
    assert!(took < Duration::from_millis(POLL_MS + 1000) * 3, "{took:?}");
    for e in &all {
        assert!(cohorts(&client, e, &people)
            .await
            .iter()
            .all(|v| v == "stable"));
    }
    // Resume: exactly the cohorts of before.
    handoffctl(&etcd, &["resume"]);
    until_all(
        "the resume",
        &client,
        &all,
        &probes,
        |_| "canary",
        Duration::from_secs(15),
    )
    .await;
    for e in &all {
        assert_eq!(
            cohorts(&client, e, &people).await,
            before,
            "cohorts after resume"
        );
    }

    // A new percent without a configuration push.
    handoffctl(&etcd, &["set-percent", "30"]);
    let newly: Vec<String> = people
        .iter()
        .filter(|u| cohort(SALT, u, 30.0) == "canary" && cohort(SALT, u, PERCENT) == "stable")
        .take(20)
        .cloned()
        .collect();
    until_all(
        "percent 30",
        &client,
        &all,
        &newly,
        |_| "canary",
        Duration::from_secs(15),
    )
    .await;
    let ids = users(10_000, "id-");
    for e in &all {
        let got = cohorts(&client, e, &ids).await;
        let share = got.iter().filter(|v| *v == "canary").count() as f64 / 100.0;
        println!("percent 30: {share}% of 10,000 ids canary through one Envoy");
        assert!((28.5..=31.5).contains(&share), "{share}%");
        for (u, v) in ids.iter().zip(&got) {
            if cohort(SALT, u, PERCENT) == "canary" {
                assert_eq!(v, "canary", "{u} moved canary -> stable");
            }
        }
        let modified = e
            .stats()
            .await
            .sum("envoy_listener_manager_listener_modified");
        assert_eq!(modified, 0.0, "no configuration was pushed");
    }
    handoffctl(&etcd, &["set-percent", "10"]);
    until_all(
        "percent 10",
        &client,
        &all,
        &newly,
        |_| "stable",
        Duration::from_secs(15),
    )
    .await;

    // etcd requests per Envoy per second, over the phases so far.
    let (calls0, t0) = calls_at_start;
    let per_envoy = (etcd_calls(&etcd).await - calls0) / 3.0 / t0.elapsed().as_secs_f64();
    let mut ours = 0.0;
    for e in &all {
        ours += rollout_requests(e).await;
    }
    let since_start = test_start.elapsed().as_secs_f64();
    println!(
        "etcd load: {per_envoy:.2} requests per Envoy per second (etcd's grpc_server_started_total, \
         handoffctl's calls included); the Envoys' own count: {:.2} per Envoy per second",
        ours / 3.0 / since_start
    );
    assert!(per_envoy < 10.0, "{per_envoy}");

    // etcd frozen: requests keep flowing with the last state.
    let up = latencies(&client, &all, 600).await;
    etcd.freeze();
    let errors_before = stat(all[0], "handoff_rollout_etcd_errors").await;
    let down = latencies(&client, &all, 600).await;
    println!(
        "p99 with etcd up: {:.1} ms, with etcd frozen: {:.1} ms (600 requests each)",
        ms(p99(&up)),
        ms(p99(&down))
    );
    assert!(p99(&down) < Duration::from_secs(2), "{:?}", p99(&down));
    support::wait_for("etcd errors counted", Duration::from_secs(10), || async {
        (stat(all[0], "handoff_rollout_etcd_errors").await > errors_before).then_some(())
    })
    .await;
    // The last state holds: percent 10, active.
    assert_eq!(cohorts(&client, all[1], &people).await, before);
    // Killed, then restarted: control resumes.
    etcd.stop();
    assert_eq!(
        cohorts(&client, all[2], &probes).await,
        vec!["canary"; probes.len()]
    );
    etcd.restart().await;
    handoffctl(&etcd, &["abort", "--reason", "after the restart"]);
    let took = until_all(
        "the abort after the restart",
        &client,
        &all,
        &probes,
        |_| "stable",
        Duration::from_secs(20),
    )
    .await;
    println!(
        "after the restart, the abort reached all three Envoys in {} ms",
        took.as_millis()
    );
    handoffctl(&etcd, &["resume"]);
    until_all(
        "the resume after the restart",
        &client,
        &all,
        &probes,
        |_| "canary",
        Duration::from_secs(20),
    )
    .await;

    // Low traffic per Envoy, a bad canary: the fleet judgment aborts it.
    drop(all);
    canary.set_fault(100, 0).await;
    let leader_key = handoff::rollout::record::leader_key(PREFIX, SALT);
    let counts_prefix = handoff::rollout::record::counts_prefix(PREFIX, SALT);
    support::wait_for("three counts keys", Duration::from_secs(20), || async {
        (etcd.count(&counts_prefix).await == 3).then_some(())
    })
    .await;
    // Per Envoy and window (2 s): 22 canary requests (< min_requests 30) and as many stable;
    // two Envoys or three sum above it.
    // Judged windows from here on hold this load only.
    let load_from = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / WINDOW_S
        + 1;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for (i, e) in envoys.iter().enumerate() {
        let url = e.url("/ping");
        let (stop, client) = (stop.clone(), client.clone());
        let users = [
            canary_users[i].clone(),
            people
                .iter()
                .zip(&before)
                .find(|(_, v)| *v == "stable")
                .unwrap()
                .0
                .clone(),
        ];
        load.push(tokio::spawn(async move {
            // At a fixed rate whatever the latency (a loaded machine must not starve the
            // fleet's sum): 2000 / 90 = 22 requests of each cohort per window and Envoy.
            let mut every = tokio::time::interval(Duration::from_millis(90));
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                every.tick().await;
                for u in &users {
                    let r = client.get(&url).header("x-user-id", u).send();
                    tokio::spawn(async move {
                        let _ = r.await;
                    });
                }
            }
        }));
    }
    // Each Envoy alone stays below min_requests (their published counts say so) ...
    let seen = std::sync::atomic::AtomicU64::new(0);
    let first = support::wait_for("a bad fleet window", Duration::from_secs(30), || {
        let (etcd, seen) = (&etcd, &seen);
        async move {
            for (w, canary) in published_counts(etcd).await {
                if w >= load_from {
                    assert!(
                        canary < MIN_REQUESTS,
                        "one Envoy alone: {canary} canary requests"
                    );
                    seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
            let r = record(etcd).await?;
            let w = &r["window"];
            (w["window"].as_u64()? >= load_from && w["bad_windows"].as_u64()? >= 1).then_some(r)
        }
    })
    .await;
    assert!(seen.into_inner() > 0, "no per-Envoy counts seen");
    println!("first bad fleet window: {}", first["window"]);
    // ... and the fleet's sum does not: the judgment is the fleet's.
    assert!(first["window"]["canary"]["requests"].as_u64().unwrap() >= MIN_REQUESTS);
    // The first bad fleet window is judged: kill the judge.
    // The judge: the Envoy whose id the leader key holds and whose gauge says so (both settle
    // within a tick of a takeover).
    let (judge_id, judge) = support::wait_for("one judge", Duration::from_secs(10), || async {
        let id = String::from_utf8(get(&etcd, &leader_key).await?).ok()?;
        let mut judges = Vec::new();
        for (i, e) in envoys.iter().enumerate() {
            if stat(e, "handoff_rollout_leader").await == 1.0 {
                judges.push(i);
            }
        }
        let said = format!("Envoy {id} judges the fleet");
        match judges[..] {
            [i] if envoys[i].log().contains(&said) => Some((id, i)),
            _ => None,
        }
    })
    .await;
    assert_eq!(
        first["state"], "active",
        "aborted before the judge was killed: {first}"
    );
    let killed = Instant::now();
    envoys[judge].stop();
    let new_id = support::wait_for(
        "another judge",
        Duration::from_secs(LEASE_TTL_S * 4),
        || async {
            let id = String::from_utf8(get(&etcd, &leader_key).await?).ok()?;
            (id != judge_id).then_some(id)
        },
    )
    .await;
    let takeover = killed.elapsed();
    println!("takeover: Envoy {new_id} judges {} ms after the judge was killed (lease TTL {LEASE_TTL_S} s)", takeover.as_millis());
    assert!(
        takeover < Duration::from_secs(LEASE_TTL_S + 3),
        "{takeover:?}"
    );
    support::wait_for(
        "the dead Envoy's counts to expire",
        Duration::from_secs(LEASE_TTL_S * 4),
        || async { (etcd.count(&counts_prefix).await == 2).then_some(()) },
    )
    .await;
    let aborted = support::wait_for("the fleet abort", Duration::from_secs(45), || async {
        let r = record(&etcd).await?;
        (r["state"] == "aborted").then_some(r)
    })
    .await;
    println!("fleet abort: {aborted}");
    assert_eq!(aborted["by"], format!("fleet:{new_id}"));
    assert!(
        aborted["reason"].as_str().unwrap().contains("Envoys"),
        "{aborted}"
    );
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for l in load {
        let _ = l.await;
    }
    let alive: Vec<&Envoy> = envoys
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != judge)
        .map(|(_, e)| e)
        .collect();
    until_all(
        "the fleet abort applied",
        &client,
        &alive,
        &probes,
        |_| "stable",
        Duration::from_secs(15),
    )
    .await;
    for e in &alive {
        // No local guard saw enough: the abort is the fleet's.
        assert_eq!(
            e.stats().await.sum_or_zero("handoff_canary_guard_aborts"),
            0.0
        );
        let log = e.log();
        assert!(
            log.contains("canary aborted fleet-wide by the fleet judgment"),
            "{log}"
        );
    }
    let fleet_aborts: f64 = {
        let mut n = 0.0;
        for e in &alive {
            n += stat(e, "handoff_rollout_fleet_aborts").await;
        }
        n
    };
    assert_eq!(fleet_aborts, 1.0);
    let status = handoffctl(&etcd, &["status"]);
    println!("{status}");
    println!("wall time {:.1} s", test_start.elapsed().as_secs_f64());
}
