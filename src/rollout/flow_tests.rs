//! The control flow against the in-memory etcd: several Envoys' flows sharing one fake,
//! driven on a simulated clock.

use super::flow::{Event, Flow, Local, Settings, Step};
use super::record::{self, Record, State};
use super::Control;
use crate::config::canary::RawGuard;
use crate::etcd::fake::{FakeEtcd, UNAVAILABLE};
use crate::etcd::Answer;
use crate::guard::{Guard, Window};

const P: &str = "/handoff/rollout/";
const S: &str = "exp";
/// A window boundary (10 s windows).
const T0: u64 = 1_764_620_000_000;

fn guard() -> Guard {
    serde_json::from_str::<RawGuard>(r#"{"window_s":10,"min_requests":100,"bad_windows":2}"#)
        .unwrap()
        .validate()
        .unwrap()
}

fn settings(guard: Option<Guard>) -> Settings {
    Settings {
        prefix: P.to_string(),
        salt: S.to_string(),
        poll_ms: 1000,
        timeout_ms: 250,
        lease_ttl_s: 10,
        guard,
    }
}

/// One Envoy: its flow, its local guard's abort and its counts per window.
struct Envoy {
    flow: Flow,
    abort: Option<(u64, String)>,
    counts: fn(u64) -> Window,
    sent: Vec<Step>,
    events: Vec<Event>,
    /// The request (counted from now) that gets a 503 instead of etcd's answer.
    fail_in: Option<usize>,
}

fn no_traffic(_: u64) -> Window {
    Window::default()
}

fn envoy(id: &str, guard: Option<Guard>) -> Envoy {
    Envoy {
        flow: Flow::new(id.to_string(), settings(guard)),
        abort: None,
        counts: no_traffic,
        sent: Vec::new(),
        events: Vec::new(),
        fail_in: None,
    }
}

impl Envoy {
    /// One tick: sends whatever is due, one request after the other, and returns the events.
    fn tick(&mut self, etcd: &FakeEtcd, now: u64) -> Vec<Event> {
        let mut out = Vec::new();
        for _ in 0..20 {
            let counts = self.flow.counts_wanted(now).map(|w| (w, (self.counts)(w)));
            let local = Local {
                abort: self.abort.as_ref().map(|(at, r)| (*at, r.as_str())),
                counts: counts.as_ref().map(|(w, c)| (*w, c)),
            };
            let Some((step, request)) = self.flow.next(now, &local) else {
                break;
            };
            self.sent.push(step);
            let (status, body) = match self.fail_in {
                Some(0) => (Some(503), UNAVAILABLE.as_bytes().to_vec()),
                _ => etcd.call(&request),
            };
            self.fail_in = self.fail_in.and_then(|n| n.checked_sub(1));
            let answer = Answer {
                status,
                body: &body,
            };
            out.extend(self.flow.answer(now, &answer, &local));
        }
        // The glue's part: a resume in the record resumes the local guard.
        if out.contains(&Event::ResumeLocal) {
            self.abort = None;
        }
        self.events.extend(out.iter().cloned());
        out
    }

    fn control(&self) -> Control {
        self.flow.control()
    }
}

/// Runs every Envoy's tick every 100 ms from `from` to `to`.
fn run(etcd: &FakeEtcd, envoys: &mut [&mut Envoy], from: u64, to: u64) {
    let mut now = from;
    while now < to {
        for e in envoys.iter_mut() {
            e.tick(etcd, now);
        }
        now += 100;
    }
}

/// What `handoffctl rollout` does: read, change, compare-and-swap.
fn operator(etcd: &FakeEtcd, change: impl Fn(&Record) -> Record) {
    let (status, body) = etcd.call(&record::read(P, S));
    let read = record::parse_read(&Answer {
        status,
        body: &body,
    })
    .unwrap();
    let next = change(&read.in_force().unwrap_or_else(Record::absent));
    let (status, body) = etcd.call(&record::write(P, S, &next, read.revision));
    let w = record::parse_write(&Answer {
        status,
        body: &body,
    })
    .unwrap();
    assert!(matches!(w, record::Written::Done(_)), "{w:?}");
}

fn stored(etcd: &FakeEtcd) -> Option<Record> {
    etcd.value(&record::record_key(P, S))
        .map(|v| Record::decode(&v).unwrap())
}

#[test]
fn every_envoy_obeys_the_record_within_a_poll() {
    let etcd = FakeEtcd::new();
    let mut e = envoy("00000000000000e1", None);
    e.tick(&etcd, T0);
    assert_eq!(e.control(), Control::default(), "absent: configured");
    assert_eq!(e.sent, vec![Step::Poll]);
    operator(&etcd, |r| r.aborted(T0 + 10, "handoffctl", "test"));
    assert!(e.tick(&etcd, T0 + 500).is_empty(), "no poll before poll_ms");
    assert_eq!(e.tick(&etcd, T0 + 1000), vec![Event::Changed]);
    assert!(e.control().aborted);
    operator(&etcd, |r| r.resumed(T0 + 1100, "handoffctl"));
    operator(&etcd, |r| r.with_percent(3000, T0 + 1200, "handoffctl"));
    e.tick(&etcd, T0 + 2000);
    assert_eq!(
        e.control(),
        Control {
            aborted: false,
            threshold: Some(3000)
        }
    );
    // Without a guard: nothing but the polls.
    assert!(e.sent.iter().all(|s| *s == Step::Poll), "{:?}", e.sent);
}

#[test]
fn a_local_abort_is_written_once_with_a_compare_and_swap() {
    let etcd = FakeEtcd::new();
    let mut e = envoy("00000000000000e1", None);
    e.abort = Some((T0, "errors 50%".to_string()));
    e.tick(&etcd, T0);
    let r = stored(&etcd).expect("written");
    assert_eq!(r.state, State::Aborted);
    assert_eq!(r.by, "envoy:00000000000000e1");
    assert_eq!(r.reason, "errors 50%");
    assert!(e.events.contains(&Event::Wrote {
        fleet: false,
        reason: "errors 50%".to_string()
    }));
    assert!(e.control().aborted);
    let rev = etcd.mod_revision(&record::record_key(P, S));
    run(&etcd, &mut [&mut e], T0 + 100, T0 + 5000);
    assert_eq!(etcd.mod_revision(&record::record_key(P, S)), rev, "once");
}

#[test]
fn a_lost_race_writes_the_abort_on_the_new_record() {
    let etcd = FakeEtcd::new();
    let mut e = envoy("00000000000000e1", None);
    e.tick(&etcd, T0);
    // The operator sets a percent after this Envoy's read, before its abort is written.
    operator(&etcd, |r| r.with_percent(3000, T0 + 50, "handoffctl"));
    e.abort = Some((T0 + 100, "latency".to_string()));
    e.tick(&etcd, T0 + 100);
    assert_eq!(e.sent, vec![Step::Poll, Step::WriteAbort, Step::WriteAbort]);
    let r = stored(&etcd).unwrap();
    assert_eq!((r.state, r.percent), (State::Aborted, Some(3000)));
}

#[test]
fn a_record_resumed_after_the_local_abort_resumes_the_local_guard() {
    let etcd = FakeEtcd::new();
    let mut e = envoy("00000000000000e1", None);
    e.abort = Some((T0, "errors".to_string()));
    e.tick(&etcd, T0);
    operator(&etcd, |r| r.resumed(T0 + 300, "handoffctl"));
    let events = e.tick(&etcd, T0 + 1000);
    assert!(events.contains(&Event::ResumeLocal), "{events:?}");
    assert_eq!(e.abort, None);
    assert_eq!(e.control(), Control::default());
    // Not written again.
    run(&etcd, &mut [&mut e], T0 + 1100, T0 + 3000);
    assert_eq!(stored(&etcd).unwrap().state, State::Active);
}

#[test]
fn an_abort_taken_during_an_outage_is_written_when_etcd_returns() {
    let etcd = FakeEtcd::new();
    let mut e = envoy("00000000000000e1", None);
    operator(&etcd, |r| r.with_percent(2000, T0 - 5000, "handoffctl"));
    e.tick(&etcd, T0);
    assert_eq!(e.control().threshold, Some(2000));
    etcd.set_down(true);
    e.abort = Some((T0 + 2000, "errors".to_string()));
    let calls = etcd.calls.borrow().len();
    run(&etcd, &mut [&mut e], T0 + 1000, T0 + 11_000);
    // One request per poll_ms while down, every one failed; the last state is kept.
    assert_eq!(etcd.calls.borrow().len() - calls, 10);
    let failed = e
        .events
        .iter()
        .filter(|ev| matches!(ev, Event::Failed(..)))
        .count();
    assert_eq!(failed, 10);
    assert_eq!(e.control().threshold, Some(2000));
    etcd.set_down(false);
    run(&etcd, &mut [&mut e], T0 + 11_000, T0 + 12_100);
    let r = stored(&etcd).unwrap();
    assert_eq!((r.state, r.percent), (State::Aborted, Some(2000)));
}

#[test]
fn a_record_changed_after_the_abort_during_an_outage_wins() {
    let etcd = FakeEtcd::new();
    let mut e = envoy("00000000000000e1", None);
    e.tick(&etcd, T0);
    etcd.set_down(true);
    e.abort = Some((T0 + 2000, "errors".to_string()));
    run(&etcd, &mut [&mut e], T0 + 1000, T0 + 4000);
    etcd.set_down(false);
    // The operator resumed (after the abort) while this Envoy could not reach etcd.
    operator(&etcd, |r| {
        r.aborted(T0 + 2500, "handoffctl", "x")
            .resumed(T0 + 3000, "handoffctl")
    });
    run(&etcd, &mut [&mut e], T0 + 4000, T0 + 6000);
    assert_eq!(stored(&etcd).unwrap().by, "handoffctl", "not overwritten");
    assert!(e.events.contains(&Event::ResumeLocal));
    assert_eq!(e.abort, None);
}

#[test]
fn garbage_keeps_the_last_record_and_an_abort_replaces_it() {
    let etcd = FakeEtcd::new();
    let mut e = envoy("00000000000000e1", None);
    operator(&etcd, |r| r.with_percent(1000, T0 - 1, "handoffctl"));
    e.tick(&etcd, T0);
    etcd.apply_silently(&crate::etcd::put(&record::record_key(P, S), b"{nope", None));
    let events = e.tick(&etcd, T0 + 1000);
    assert!(matches!(events[..], [Event::Garbage(_)]), "{events:?}");
    assert_eq!(e.control().threshold, Some(1000), "kept");
    e.abort = Some((T0 + 1500, "errors".to_string()));
    e.tick(&etcd, T0 + 1500);
    assert_eq!(stored(&etcd).unwrap().state, State::Aborted);
    // A deleted record is active at the configured percent again.
    let mut d = envoy("00000000000000e2", None);
    let absent = FakeEtcd::new();
    d.tick(&absent, T0);
    assert_eq!(d.control(), Control::default());
}

#[test]
fn every_step_survives_an_etcd_error() {
    let mut failed = std::collections::BTreeSet::new();
    for failing in 0..30 {
        let etcd = FakeEtcd::new();
        let mut e = envoy("00000000000000e1", Some(guard()));
        e.counts = healthy;
        run(&etcd, &mut [&mut e], T0, T0 + 1000);
        assert!(e.flow.leader());
        e.fail_in = Some(failing);
        run(&etcd, &mut [&mut e], T0 + 1000, T0 + 25_000);
        let f = e.events.iter().find_map(|ev| match ev {
            Event::Failed(step, _) => Some(*step),
            _ => None,
        });
        failed.insert(f.expect("the 503 was seen").as_str());
        // Still working after the error: leading, the record read, the windows judged.
        run(&etcd, &mut [&mut e], T0 + 25_000, T0 + 50_000);
        assert!(e.flow.leader(), "{failing}: {:?}", e.events);
        let w = stored(&etcd).and_then(|r| r.window);
        assert!(
            w.is_some_and(|w| w.window >= (T0 + 30_000) / 10_000),
            "{failing}"
        );
    }
    for step in ["poll", "keepalive", "publish", "gather", "judge"] {
        assert!(failed.contains(step), "{step} never failed: {failed:?}");
    }
}

fn bad_canary(_: u64) -> Window {
    // 60 canary requests (below min_requests 100) with 30 errors, 60 stable without.
    let mut w = Window::default();
    for i in 0..60 {
        w.canary.record(1000, i % 2 == 0);
        w.stable.record(1000, false);
    }
    w
}

fn healthy(_: u64) -> Window {
    let mut w = Window::default();
    for _ in 0..40 {
        w.canary.record(1000, false);
        w.stable.record(1000, false);
    }
    w
}

#[test]
fn the_fleet_judgment_aborts_what_no_envoy_sees_alone() {
    let etcd = FakeEtcd::new();
    let g = guard();
    let ids = ["00000000000000a1", "00000000000000a2", "00000000000000a3"];
    let [mut a, mut b, mut c] = ids.map(|id| envoy(id, Some(g.clone())));
    for e in [&mut a, &mut b, &mut c] {
        e.counts = healthy;
    }
    run(&etcd, &mut [&mut a, &mut b, &mut c], T0, T0 + 30_000);
    let leaders = [&a, &b, &c].iter().filter(|e| e.flow.leader()).count();
    assert_eq!(leaders, 1, "one judge");
    let w = stored(&etcd).unwrap().window.unwrap();
    assert_eq!((w.envoys, w.bad_windows), (3, 0));
    assert_eq!(w.canary.requests, 120);
    assert!(
        w.canary.requests < 3 * 100,
        "healthy(): each Envoy below min_requests"
    );
    assert_eq!(stored(&etcd).unwrap().state, State::Active);
    for e in [&mut a, &mut b, &mut c] {
        e.counts = bad_canary;
    }
    run(
        &etcd,
        &mut [&mut a, &mut b, &mut c],
        T0 + 30_000,
        T0 + 60_000,
    );
    let r = stored(&etcd).unwrap();
    assert_eq!(r.state, State::Aborted);
    assert!(r.by.starts_with("fleet:"), "{}", r.by);
    assert!(r.reason.contains("summed over 3 Envoys"), "{}", r.reason);
    assert_eq!(r.window.as_ref().unwrap().bad_windows, 2);
    for e in [&a, &b, &c] {
        assert!(e.control().aborted);
    }
    let judge = [&a, &b, &c].into_iter().find(|e| e.flow.leader()).unwrap();
    assert!(judge
        .events
        .iter()
        .any(|ev| matches!(ev, Event::Wrote { fleet: true, .. })));
}

#[test]
fn a_new_leader_continues_the_row_and_dead_counts_expire() {
    let etcd = FakeEtcd::new();
    let g = guard();
    let [mut a, mut b] =
        ["00000000000000a1", "00000000000000a2"].map(|id| envoy(id, Some(g.clone())));
    a.counts = bad_canary;
    b.counts = bad_canary;
    // `a` polls first and leads.
    run(&etcd, &mut [&mut a, &mut b], T0, T0 + 1000);
    assert!(a.flow.leader() && !b.flow.leader());
    // Run until the first bad window is judged (row 1 of 2).
    let mut now = T0 + 1000;
    while stored(&etcd)
        .and_then(|r| r.window)
        .map_or(0, |w| w.bad_windows)
        < 1
    {
        run(&etcd, &mut [&mut a, &mut b], now, now + 100);
        now += 100;
        assert!(now < T0 + 40_000);
    }
    let judged = stored(&etcd).unwrap().window.unwrap().window;
    // `a` dies: its lease expires; `b` takes the leader key at its next poll.
    etcd.expire_lease(a.flow.lease().unwrap());
    assert_eq!(
        etcd.value(&record::counts_key(P, S, "00000000000000a1")),
        None
    );
    let died = now;
    // Alone, `b` now sees enough traffic to keep the row going.
    b.counts = |w| {
        let mut x = bad_canary(w);
        x.add(&bad_canary(w));
        x
    };
    while !b.flow.leader() {
        run(&etcd, &mut [&mut b], now, now + 100);
        now += 100;
    }
    assert!(
        now - died <= 1100,
        "took over within a poll once the lease expired"
    );
    assert_eq!(
        etcd.value(&record::leader_key(P, S)),
        Some(b"00000000000000a2".to_vec())
    );
    run(&etcd, &mut [&mut b], now, now + 20_000);
    let r = stored(&etcd).unwrap();
    assert_eq!(r.state, State::Aborted, "{r:?}");
    assert_eq!(r.by, "fleet:00000000000000a2");
    let w = r.window.unwrap();
    assert_eq!((w.window, w.bad_windows, w.envoys), (judged + 1, 2, 1));
}

#[test]
fn a_lease_unrenewed_for_a_ttl_is_given_up() {
    let etcd = FakeEtcd::new();
    let mut a = envoy("00000000000000a1", Some(guard()));
    run(&etcd, &mut [&mut a], T0, T0 + 1000);
    assert!(a.flow.leader());
    etcd.set_down(true);
    run(&etcd, &mut [&mut a], T0 + 1000, T0 + 12_000);
    assert!(!a.flow.leader());
    etcd.set_down(false);
    // Its lease really is gone in etcd too (expired meanwhile).
    etcd.expire_lease(7001);
    run(&etcd, &mut [&mut a], T0 + 12_000, T0 + 14_000);
    assert!(a.flow.leader(), "a new lease, the key taken again");
}

#[test]
fn etcd_load_is_linear_in_the_envoys() {
    let etcd = FakeEtcd::new();
    let g = guard();
    let mut envoys: Vec<Envoy> = (0..20)
        .map(|i| {
            let mut e = envoy(&format!("{i:016x}"), Some(g.clone()));
            e.counts = healthy;
            e
        })
        .collect();
    let mut refs: Vec<&mut Envoy> = envoys.iter_mut().collect();
    run(&etcd, &mut refs, T0, T0 + 20_000);
    let before = etcd.calls.borrow().len();
    let proposals_before = etcd.proposals.get();
    run(&etcd, &mut refs, T0 + 20_000, T0 + 120_000);
    let per_envoy_per_s = (etcd.calls.borrow().len() - before) as f64 / 20.0 / 100.0;
    // A poll a second, a counts put and a keepalive share per window, one gather a window.
    assert!(per_envoy_per_s < 1.5, "{per_envoy_per_s}");
    // Polls are reads (no raft proposal): what goes through consensus is a counts put per
    // Envoy per window and the judge's record write.
    let proposals = (etcd.proposals.get() - proposals_before) as f64 / 20.0 / 100.0;
    assert!(
        proposals < 0.15,
        "raft proposals per Envoy per second: {proposals}"
    );
    let gathers: usize = refs
        .iter()
        .map(|e| e.sent.iter().filter(|s| **s == Step::Gather).count())
        .sum();
    assert!(
        (11..=13).contains(&gathers),
        "one judge, one range read per window: {gathers}"
    );
}

#[test]
fn two_judges_for_a_moment_write_each_window_once() {
    let etcd = FakeEtcd::new();
    let g = guard();
    let [mut a, mut b] =
        ["00000000000000a1", "00000000000000a2"].map(|id| envoy(id, Some(g.clone())));
    a.counts = healthy;
    b.counts = healthy;
    run(&etcd, &mut [&mut a, &mut b], T0, T0 + 1000);
    assert!(a.flow.leader());
    // The leader key vanishes while `a` still believes it judges: `b` takes it too.
    let key = record::leader_key(P, S);
    etcd.apply_silently(&crate::etcd::txn(
        &[],
        &[crate::etcd::Op::Delete(&key)],
        &[],
    ));
    run(&etcd, &mut [&mut a, &mut b], T0 + 1000, T0 + 60_000);
    assert!(a.flow.leader() && b.flow.leader());
    let mut judged: Vec<u64> = [&a, &b]
        .iter()
        .flat_map(|e| e.events.iter())
        .filter_map(|ev| match ev {
            Event::Judged(w) => Some(w.window),
            _ => None,
        })
        .collect();
    let n = judged.len();
    judged.sort();
    judged.dedup();
    assert_eq!(judged.len(), n, "a window written twice: {judged:?}");
    assert!(n >= 4, "{n}");
}
