//! etcd crashes and comes back mid-load: two Envoys (`envoy/idempotency-etcd.yaml`)
//! share one real etcd in front of one `payments` upstream. A steady load of POSTs with unique
//! `Idempotency-Key`s alternates between the Envoys and between HTTP/1.1 and HTTP/2, with
//! retries of completed keys sent to the *other* Envoy. Mid-load etcd is killed (SIGKILL), the
//! load goes on, etcd is started again on the same ports and data directory, the load goes on.
//! Every answer is checked against the idempotency table of docs/configure/idempotency.md, and every key's executions in
//! the app against the answers its requests got.
#![cfg(not(target_arch = "wasm32"))]

mod support;

use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::etcd::{outcome, two_envoys, Etcd};
use support::{h1, h2, payment, Backend, Envoy};

const PAY: &str = "/api/v1/payments";
/// Concurrent load tasks (each sends one request at a time).
const WORKERS: u64 = 4;

/// Where the fault is when a request is sent and when its answer arrives.
const BEFORE: u8 = 0;
/// etcd is killed and not started yet.
const OUTAGE: u8 = 1;
/// etcd is starting (not healthy yet).
const RESTARTING: u8 = 2;
/// etcd reported healthy again.
const AFTER: u8 = 3;
/// (Of a retried key's first answer) sent and answered in different phases: whether its
/// record reached etcd is not known.
const STRADDLED: u8 = 4;

#[derive(Debug, Clone)]
struct Answer {
    key: String,
    /// Index of the Envoy that got the request.
    envoy: usize,
    /// A repeat of a key that already got a 201 (from the other Envoy).
    retry: bool,
    /// For a retry: the phase of the key's first 201 ([`Answer::settled`]).
    original: Option<u8>,
    sent: u8,
    answered: u8,
    /// 0: no answer (transport error or client timeout).
    status: u16,
    replayed: bool,
    content_type: String,
    retry_after: String,
    /// The problem `type` after its `#`.
    problem: String,
    elapsed: Duration,
}

impl Answer {
    /// Sent and answered within one phase.
    fn within(&self, phase: u8) -> bool {
        self.sent == phase && self.answered == phase
    }

    /// The phase the request lived in, or [`STRADDLED`].
    fn settled(&self) -> u8 {
        if self.sent == self.answered {
            self.sent
        } else {
            STRADDLED
        }
    }

    fn executed(&self) -> bool {
        self.status == 201 && !self.replayed
    }
}

/// A key that got a 201: where and when, for retries.
#[derive(Clone)]
struct Done {
    key: String,
    n: u64,
    envoy: usize,
    phase: u8,
}

struct Load {
    phase: AtomicU8,
    stop: AtomicBool,
    next: AtomicU64,
    tag: &'static str,
    urls: [String; 2],
    clients: [reqwest::Client; 2],
    answers: Mutex<Vec<Answer>>,
    done: Mutex<Vec<Done>>,
}

impl Load {
    fn new(tag: &'static str, a: &Envoy, b: &Envoy) -> Arc<Load> {
        Arc::new(Load {
            phase: AtomicU8::new(BEFORE),
            stop: AtomicBool::new(false),
            next: AtomicU64::new(0),
            tag,
            urls: [a.url(PAY), b.url(PAY)],
            clients: [h1(), h2()],
            answers: Mutex::new(Vec::new()),
            done: Mutex::new(Vec::new()),
        })
    }

    fn phase(&self) -> u8 {
        self.phase.load(Ordering::SeqCst)
    }

    /// One POST; records and returns the answer.
    async fn send(
        &self,
        key: &str,
        n: u64,
        envoy: usize,
        proto: usize,
        original: Option<u8>,
    ) -> Answer {
        let sent = self.phase();
        let start = Instant::now();
        let r = self.clients[proto]
            .post(&self.urls[envoy])
            .header("idempotency-key", key)
            .json(&payment(n))
            .send()
            .await;
        let mut answer = Answer {
            key: key.to_string(),
            envoy,
            retry: original.is_some(),
            original,
            sent,
            answered: sent,
            status: 0,
            replayed: false,
            content_type: String::new(),
            retry_after: String::new(),
            problem: String::new(),
            elapsed: Duration::ZERO,
        };
        if let Ok(r) = r {
            let header = |name: &str| {
                r.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string()
            };
            answer.status = r.status().as_u16();
            answer.replayed = header("idempotent-replayed") == "true";
            answer.content_type = header("content-type");
            answer.retry_after = header("retry-after");
            if let Ok(body) = r.bytes().await {
                if answer.content_type == "application/problem+json" {
                    let v: Value = serde_json::from_slice(&body).unwrap_or_default();
                    let t = v["type"].as_str().unwrap_or_default();
                    answer.problem = t.rsplit_once('#').map(|(_, f)| f).unwrap_or(t).into();
                }
            } else {
                answer.status = 0;
            }
        }
        answer.elapsed = start.elapsed();
        answer.answered = self.phase();
        self.answers.lock().unwrap().push(answer.clone());
        answer
    }

    /// One load task: a new key per round on alternating Envoys and protocols; every third
    /// 201 is retried at once on the other Envoy, and every other round also retries a key
    /// completed before the outage, on the other Envoy.
    async fn worker(self: Arc<Load>) {
        while !self.stop.load(Ordering::SeqCst) {
            let n = self.next.fetch_add(1, Ordering::SeqCst);
            let (envoy, proto) = ((n % 2) as usize, ((n / 2) % 2) as usize);
            let key = format!("{}-{n}", self.tag);
            let first = self.send(&key, n, envoy, proto, None).await;
            if first.executed() {
                self.done.lock().unwrap().push(Done {
                    key: key.clone(),
                    n,
                    envoy,
                    phase: first.settled(),
                });
                if n % 3 == 0 {
                    self.send(&key, n, 1 - envoy, 1 - proto, Some(first.settled()))
                        .await;
                }
            }
            if n % 2 == 1 {
                let old = {
                    let done = self.done.lock().unwrap();
                    let before: Vec<&Done> = done.iter().filter(|d| d.phase == BEFORE).collect();
                    (!before.is_empty()).then(|| before[(n as usize * 7) % before.len()].clone())
                };
                if let Some(d) = old {
                    self.send(&d.key, d.n, 1 - d.envoy, proto, Some(BEFORE))
                        .await;
                }
            }
        }
    }

    fn count(&self, f: impl Fn(&Answer) -> bool) -> usize {
        self.answers.lock().unwrap().iter().filter(|a| f(a)).count()
    }

    /// Waits until `n` answers match `f` (the load runs meanwhile).
    async fn until(&self, what: &str, n: usize, f: impl Fn(&Answer) -> bool) {
        support::wait_for(what, Duration::from_secs(30), || {
            let got = self.count(&f);
            async move { (got >= n).then_some(()) }
        })
        .await;
    }
}

/// Runs the load across a kill and a restart of etcd; returns every answer.
async fn run(tag: &'static str, etcd: &mut Etcd, a: &Envoy, b: &Envoy) -> Vec<Answer> {
    let load = Load::new(tag, a, b);
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| tokio::spawn(load.clone().worker()))
        .collect();
    load.until("load before the outage", 60, |a| {
        a.within(BEFORE) && !a.retry
    })
    .await;
    load.until("retries before the outage", 10, |a| {
        a.within(BEFORE) && a.retry
    })
    .await;

    etcd.stop();
    load.phase.store(OUTAGE, Ordering::SeqCst);
    let stopped = Instant::now();
    load.until("load during the outage", 40, |a| a.within(OUTAGE))
        .await;
    // Keep the outage for a while whatever the request rate: stale connections, timeouts
    // and the cached lease all get their chance to misbehave.
    support::wait_for("a long enough outage", Duration::from_secs(10), || async {
        (stopped.elapsed() >= Duration::from_millis(1500)).then_some(())
    })
    .await;

    load.phase.store(RESTARTING, Ordering::SeqCst);
    etcd.restart().await;
    load.phase.store(AFTER, Ordering::SeqCst);
    load.until("new keys after the restart", 60, |a| {
        a.within(AFTER) && !a.retry
    })
    .await;
    load.until("retries after the restart", 20, |a| {
        a.within(AFTER) && a.retry && a.original == Some(BEFORE)
    })
    .await;
    load.stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.expect("load task");
    }
    let answers = load.answers.lock().unwrap().clone();
    answers
}

/// Executions per key in the app.
async fn executions(backend: &Backend) -> BTreeMap<String, u64> {
    backend.executions().await
}

/// Checks every key's execution count against its answers: the app ran a key exactly as many
/// times as it answered 201 without `idempotent-replayed` (no lost, no hidden execution).
fn assert_executions_match(answers: &[Answer], executions: &BTreeMap<String, u64>, tag: &str) {
    let mut expected: BTreeMap<&str, u64> = BTreeMap::new();
    for a in answers {
        *expected.entry(&a.key).or_default() += u64::from(a.executed());
    }
    for (key, n) in &expected {
        assert_eq!(
            executions.get(*key).copied().unwrap_or(0),
            *n,
            "executions of {key} vs its 201 answers: {:?}",
            answers.iter().filter(|a| a.key == *key).collect::<Vec<_>>()
        );
    }
    let ours = executions
        .keys()
        .filter(|k| k.starts_with(&format!("{tag}-")))
        .count();
    assert_eq!(ours, expected.values().filter(|n| **n > 0).count());
}

fn assert_all_answered(answers: &[Answer]) {
    for a in answers {
        assert_ne!(a.status, 0, "no answer: {a:?}");
        // The etcd callout timeout is 2 s in these tests; nothing may wait much longer.
        assert!(a.elapsed < Duration::from_secs(10), "slow answer: {a:?}");
    }
    // With etcd down, an answer takes at most one callout timeout (2 s) and a bit.
    for a in answers.iter().filter(|a| a.within(OUTAGE)) {
        assert!(
            a.elapsed < Duration::from_secs(3),
            "slow outage answer: {a:?}"
        );
    }
}

fn slowest(answers: &[Answer], phase: u8) -> Duration {
    answers
        .iter()
        .filter(|a| a.within(phase))
        .map(|a| a.elapsed)
        .max()
        .unwrap_or_default()
}

/// With etcd up (before the crash, and again once it is back) new keys execute and retries of
/// keys completed with etcd up are replays.
fn assert_dedup_while_up(answers: &[Answer]) {
    for phase in [BEFORE, AFTER] {
        for a in answers.iter().filter(|a| a.within(phase)) {
            match a.original {
                None => assert!(a.executed(), "new key, phase {phase}: {a:?}"),
                Some(BEFORE) | Some(AFTER) => {
                    assert!(a.status == 201 && a.replayed, "retry, phase {phase}: {a:?}")
                }
                Some(_) => {}
            }
        }
    }
}

async fn sum_outcome(envoys: [&Envoy; 2], name: &str) -> f64 {
    outcome(envoys[0], name).await + outcome(envoys[1], name).await
}

#[tokio::test]
async fn etcd_restart_mid_load_with_on_error_reject() {
    let (mut etcd, backend, a, b) = two_envoys("reject", 30).await;
    let mut answers = run("rj", &mut etcd, &a, &b).await;
    assert_all_answered(&answers);

    // During the outage: 503 problem, retry-after 1, for new keys and retries alike.
    let outage: Vec<Answer> = answers
        .iter()
        .filter(|a| a.within(OUTAGE))
        .cloned()
        .collect();
    assert!(outage.len() >= 40);
    for a in &outage {
        assert!(
            a.status == 503
                && a.content_type == "application/problem+json"
                && a.problem == "idempotency-store-unavailable"
                && a.retry_after == "1",
            "answer during the outage: {a:?}"
        );
    }
    assert!(outage.iter().any(|a| a.retry), "retries hit the outage too");
    assert_dedup_while_up(&answers);

    // A client retries what it got 503 for, and what was in flight when etcd died (its 201
    // arrived, but the completion may not have reached etcd), on the other Envoy.
    let rejected: Vec<Answer> = answers
        .iter()
        .filter(|a| a.status == 503 && !a.retry)
        .cloned()
        .collect();
    let straddled: Vec<Answer> = answers
        .iter()
        .filter(|a| a.executed() && a.sent == BEFORE && a.answered != BEFORE)
        .cloned()
        .collect();
    let load = Load::new("rj", &a, &b);
    load.phase.store(AFTER, Ordering::SeqCst);
    let mut locked_after_crash = 0;
    for (i, old) in rejected.iter().chain(&straddled).enumerate() {
        let n: u64 = old.key.trim_start_matches("rj-").parse().unwrap();
        let r = load
            .send(&old.key, n, 1 - old.envoy, i % 2, Some(STRADDLED))
            .await;
        let first_time = old.status == 503;
        match (r.status, r.replayed, r.problem.as_str()) {
            (201, false, _) if first_time => {}
            (201, true, _) if !first_time => {}
            // The lock (or the completion) was written just before etcd died but its answer
            // was lost: the key stays locked until lock_timeout_s. Never executed twice.
            (409, _, "idempotency-in-flight") => locked_after_crash += 1,
            _ => panic!("retry after the restart of {old:?}: {r:?}"),
        }
    }
    answers.extend(load.answers.lock().unwrap().iter().cloned());

    let executions = executions(&backend).await;
    assert_executions_match(&answers, &executions, "rj");
    for (key, n) in &executions {
        assert!(*n <= 1, "{key} executed {n} times");
    }
    // The metrics count the outage: one store_error per 503, one first per execution.
    let unavailable = answers.iter().filter(|a| a.status == 503).count() as f64;
    assert_eq!(sum_outcome([&a, &b], "store_error").await, unavailable);
    let executed: u64 = executions.values().sum();
    assert_eq!(sum_outcome([&a, &b], "first").await, executed as f64);
    let replayed = answers.iter().filter(|a| a.replayed).count() as f64;
    assert_eq!(sum_outcome([&a, &b], "replayed").await, replayed);
    eprintln!(
        "reject: {} answers, {} during the outage (slowest {:?}), {} 503, {} straddling the \
         crash, {locked_after_crash} locked after it, {executed} executions",
        answers.len(),
        outage.len(),
        slowest(&answers, OUTAGE),
        unavailable,
        straddled.len()
    );
    assert!(
        locked_after_crash <= straddled.len() + 2,
        "{locked_after_crash} keys stayed locked"
    );
    for envoy in [&a, &b] {
        assert!(support::panic_lines(&envoy.log()).is_empty());
    }
}

#[tokio::test]
async fn etcd_restart_mid_load_with_on_error_allow() {
    let (mut etcd, backend, a, b) = two_envoys("allow", 30).await;
    let answers = run("al", &mut etcd, &a, &b).await;
    assert_all_answered(&answers);

    // During the outage everything is forwarded unprotected: new keys and retries execute.
    let outage: Vec<&Answer> = answers.iter().filter(|a| a.within(OUTAGE)).collect();
    assert!(outage.len() >= 40);
    for a in &outage {
        assert!(a.executed(), "answer during the outage: {a:?}");
    }
    assert_dedup_while_up(&answers);

    let executions = executions(&backend).await;
    assert_executions_match(&answers, &executions, "al");
    // The documented cost of `allow`: a retry during the outage of a key completed before it
    // executed the operation again.
    let twice = outage.iter().filter(|a| a.retry).count();
    assert!(twice > 0);
    for a in outage.iter().filter(|a| a.retry) {
        assert!(executions[&a.key] >= 2, "{a:?}");
    }
    // Every execution was either a `first` (locked in etcd) or a `store_error` (forwarded
    // unprotected); every request answered inside the outage is one of the latter.
    let executed: u64 = executions.values().sum();
    let store_errors = sum_outcome([&a, &b], "store_error").await;
    assert_eq!(
        sum_outcome([&a, &b], "first").await + store_errors,
        executed as f64
    );
    assert!(store_errors >= outage.len() as f64);
    let replayed = answers.iter().filter(|a| a.replayed).count() as f64;
    assert_eq!(sum_outcome([&a, &b], "replayed").await, replayed);
    eprintln!(
        "allow: {} answers, {} during the outage (slowest {:?}; {twice} retries executed \
         again), {store_errors} store_error, {executed} executions",
        answers.len(),
        outage.len(),
        slowest(&answers, OUTAGE)
    );
    for envoy in [&a, &b] {
        assert!(support::panic_lines(&envoy.log()).is_empty());
    }
}
