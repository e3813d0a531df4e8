use super::*;
use crate::etcd::fake::{FakeEtcd, UNAVAILABLE};
use crate::etcd::Answer;

const FP: [u8; 32] = [1; 32];
const KEY: [u8; 32] = [9; 32];
const TIMEOUT: u64 = 30_000;
const TTL: u64 = 86_400_000;

fn settings(on_error: OnError) -> Settings<'static> {
    Settings {
        prefix: "/handoff/idem/",
        ttl_s: 86_400,
        lock_timeout_ms: TIMEOUT,
        on_error,
    }
}

const REJECT: Settings<'static> = Settings {
    prefix: "/handoff/idem/",
    ttl_s: 86_400,
    lock_timeout_ms: TIMEOUT,
    on_error: OnError::Reject,
};

fn answer(c: &(Option<u16>, Vec<u8>)) -> Answer<'_> {
    Answer {
        status: c.0,
        body: &c.1,
    }
}

/// Runs one request's lock flow against `etcd` until it decides; returns the decision and
/// the number of etcd calls it made.
fn run(
    etcd: &FakeEtcd,
    s: &Settings,
    owner: u64,
    fp: [u8; 32],
    now: u64,
    leases: &mut LeaseCache,
) -> (Next, usize) {
    let (mut flow, mut next) = LockFlow::start(s, KEY, fp, owner, now, leases);
    let mut calls = 0;
    while let Next::Send(req) = &next {
        calls += 1;
        assert!(calls < 10, "the flow must end");
        let got = etcd.call(req);
        next = flow.on_answer(s, &answer(&got), now, leases);
    }
    (next, calls)
}

fn locked(n: Next) -> EtcdLock {
    match n {
        Next::Locked(l) => l,
        other => panic!("expected the lock, got {other:?}"),
    }
}

fn resp() -> StoredResponse {
    StoredResponse {
        status: 201,
        headers: vec![("content-type".into(), "application/json".into())],
        body: b"{\"id\":\"tx-1\"}".to_vec(),
    }
}

fn key() -> String {
    etcd_key("/handoff/idem/", &KEY)
}

#[test]
fn first_in_flight_mismatch_replay() {
    let etcd = FakeEtcd::new();
    let mut leases = LeaseCache::default();
    let (next, calls) = run(&etcd, &REJECT, 1, FP, 1000, &mut leases);
    assert_eq!(calls, 2, "a lease, then the lock");
    let lock = locked(next);
    assert_eq!(etcd.mod_revision(&key()), Some(lock.revision));
    assert_eq!(lock.meta.expires_at_ms, 1000 + TIMEOUT);
    // The lease is reused: one call from now on.
    let (next, calls) = run(&etcd, &REJECT, 2, FP, 1001, &mut leases);
    assert_eq!(
        (next, calls),
        (Next::Reply(Verdict::Problem(Outcome::InFlightConflict)), 1)
    );
    let (next, _) = run(&etcd, &REJECT, 2, [2; 32], 1001, &mut leases);
    assert_eq!(next, Next::Reply(Verdict::Problem(Outcome::Mismatch)));
    // Completed: replayed.
    let got = etcd.call(&complete(&lock, Some(&resp()), 1002, TTL));
    assert_eq!(settle(Write::Complete, 1, &answer(&got)), Settled::Done);
    let (next, _) = run(&etcd, &REJECT, 3, FP, 1003, &mut leases);
    assert_eq!(next, Next::Reply(Verdict::Replay(resp())));
    // Too large to store: completed, not replayable.
    let etcd = FakeEtcd::new();
    let lock = locked(run(&etcd, &REJECT, 1, FP, 1000, &mut leases).0);
    etcd.call(&complete(&lock, None, 1001, TTL));
    let (next, _) = run(&etcd, &REJECT, 2, FP, 1002, &mut leases);
    assert_eq!(next, Next::Reply(Verdict::Problem(Outcome::NotReplayable)));
}

#[test]
fn the_lease_is_reused_for_a_minute_then_renewed() {
    let mut leases = LeaseCache::default();
    assert_eq!(leases.fresh(0), None);
    leases.granted(5, 1000);
    assert_eq!(leases.fresh(1000 + LEASE_REUSE_S * 1000 - 1), Some(5));
    assert_eq!(leases.fresh(1000 + LEASE_REUSE_S * 1000), None);
    // The grant asks for the TTL plus the reuse time, so the last record it carries still
    // lives ttl_s.
    let (_, next) = LockFlow::start(&REJECT, KEY, FP, 1, 0, &LeaseCache::default());
    match next {
        Next::Send(r) => assert_eq!(r, crate::etcd::lease_grant(86_400 + LEASE_REUSE_S)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_abandoned_lock_is_taken_over_and_its_owner_cannot_complete() {
    let etcd = FakeEtcd::new();
    let mut leases = LeaseCache::default();
    let old = locked(run(&etcd, &REJECT, 1, FP, 1000, &mut leases).0);
    // Before lock_timeout_s: in flight.
    let (next, _) = run(&etcd, &REJECT, 2, FP, 1000 + TIMEOUT - 1, &mut leases);
    assert_eq!(
        next,
        Next::Reply(Verdict::Problem(Outcome::InFlightConflict))
    );
    let (next, calls) = run(&etcd, &REJECT, 2, FP, 1000 + TIMEOUT, &mut leases);
    assert_eq!(calls, 2, "the read, then the takeover");
    let new = locked(next);
    assert!(new.revision > old.revision);
    let got = etcd.call(&complete(&old, Some(&resp()), 1000 + TIMEOUT, TTL));
    assert_eq!(settle(Write::Complete, 1, &answer(&got)), Settled::Lost);
    let got = etcd.call(&release(&old));
    assert_eq!(settle(Write::Release, 1, &answer(&got)), Settled::Done);
    assert_eq!(etcd.mod_revision(&key()), Some(new.revision), "untouched");
}

#[test]
fn a_lost_takeover_race_reads_again() {
    // Two takers read the same abandoned lock; the first one's put changes the revision, so
    // the second one's compare fails and it finds the winner's lock: 409.
    let etcd = FakeEtcd::new();
    let mut leases = LeaseCache::default();
    locked(run(&etcd, &REJECT, 1, FP, 1000, &mut leases).0);
    let now = 1000 + TIMEOUT;
    let (mut a, next_a) = LockFlow::start(&REJECT, KEY, FP, 2, now, &leases);
    let (mut b, next_b) = LockFlow::start(&REJECT, KEY, FP, 3, now, &leases);
    let (Next::Send(ra), Next::Send(rb)) = (next_a, next_b) else {
        panic!("both read first");
    };
    let (ga, gb) = (etcd.call(&ra), etcd.call(&rb));
    let next_a = a.on_answer(&REJECT, &answer(&ga), now, &mut leases);
    let next_b = b.on_answer(&REJECT, &answer(&gb), now, &mut leases);
    let (Next::Send(ta), Next::Send(tb)) = (next_a, next_b) else {
        panic!("both try to take over");
    };
    let won = a.on_answer(&REJECT, &answer(&etcd.call(&ta)), now, &mut leases);
    let lost = b.on_answer(&REJECT, &answer(&etcd.call(&tb)), now, &mut leases);
    assert!(matches!(won, Next::Locked(l) if l.meta.owner == 2));
    assert_eq!(
        lost,
        Next::Reply(Verdict::Problem(Outcome::InFlightConflict))
    );
}

#[test]
fn a_key_that_keeps_vanishing_ends_in_409_after_the_attempts() {
    // The compare says "exists", the read finds nothing (its lease expired in between), on
    // every attempt.
    let etcd = FakeEtcd::new();
    let mut leases = LeaseCache::default();
    leases.granted(7001, 0);
    let gone = r#"{"header":{"revision":"5"},"responses":[{"response_range":{"header":{}}}]}"#;
    for _ in 0..ATTEMPTS {
        etcd.then_answer(Some(200), gone);
    }
    let (next, calls) = run(&etcd, &REJECT, 1, FP, 1000, &mut leases);
    assert_eq!(calls, usize::from(ATTEMPTS));
    assert_eq!(
        next,
        Next::Reply(Verdict::Problem(Outcome::InFlightConflict))
    );
}

#[test]
fn every_error_at_every_step_follows_on_error() {
    let errors: [(Option<u16>, &str); 5] = [
        (None, ""),
        (Some(503), UNAVAILABLE),
        (Some(503), "no healthy upstream"),
        (Some(200), "<html>"),
        (Some(400), r#"{"error":"bad","message":"bad","code":3}"#),
    ];
    // Step 0 is the lease grant (no cached lease); step 1 the lock transaction.
    for step in 0..2 {
        for (status, body) in errors {
            for (on_error, expected) in [
                (
                    OnError::Reject,
                    Next::Reply(Verdict::Problem(Outcome::StoreError)),
                ),
                (OnError::Allow, Next::Unprotected),
            ] {
                let etcd = FakeEtcd::new();
                let s = settings(on_error);
                let mut leases = LeaseCache::default();
                let (mut flow, mut next) = LockFlow::start(&s, KEY, FP, 1, 1000, &leases);
                for _ in 0..step {
                    let Next::Send(r) = &next else { panic!() };
                    next = flow.on_answer(&s, &answer(&etcd.call(r)), 1000, &mut leases);
                }
                assert!(matches!(next, Next::Send(_)));
                let bad = (status, body.as_bytes().to_vec());
                let next = flow.on_answer(&s, &answer(&bad), 1000, &mut leases);
                assert_eq!(next, expected, "step {step}, {status:?} {body}");
                assert!(flow.failure.is_some());
                // Only a lock transaction can have written something to undo.
                assert_eq!(flow.take_undo().is_some(), step == 1, "step {step}");
                assert_eq!(
                    leases.fresh(1000),
                    None,
                    "the lease is not trusted after a failure"
                );
                assert!(etcd.is_empty(), "nothing locked");
            }
        }
    }
    // A request that cannot even be sent.
    let mut leases = LeaseCache::default();
    let (mut flow, _) = LockFlow::start(&REJECT, KEY, FP, 1, 0, &leases);
    assert_eq!(
        flow.unsent(&REJECT, &mut leases),
        Next::Reply(Verdict::Problem(Outcome::StoreError))
    );
}

#[test]
fn a_lease_etcd_lost_is_granted_again() {
    let etcd = FakeEtcd::new();
    let mut leases = LeaseCache::default();
    let first = locked(run(&etcd, &REJECT, 1, FP, 1000, &mut leases).0);
    etcd.expire_lease(first.lease);
    let mut other = KEY;
    other[0] = 1;
    let (mut flow, mut next) = LockFlow::start(&REJECT, other, FP, 2, 1001, &leases);
    let mut calls = 0;
    while let Next::Send(r) = &next {
        calls += 1;
        next = flow.on_answer(&REJECT, &answer(&etcd.call(r)), 1001, &mut leases);
    }
    assert_eq!(calls, 3, "lock refused, a new lease, the lock");
    assert_ne!(locked(next).lease, first.lease);
}

#[test]
fn settling_completions_and_releases() {
    let etcd = FakeEtcd::new();
    let mut leases = LeaseCache::default();
    let lock = locked(run(&etcd, &REJECT, 1, FP, 1000, &mut leases).0);
    let done = complete(&lock, Some(&resp()), 1001, TTL);
    // The first attempt was applied but its answer lost: the retry's compare fails on our own
    // completion, which counts as stored.
    etcd.apply_silently(&done);
    let got = etcd.call(&done);
    assert_eq!(settle(Write::Complete, 1, &answer(&got)), Settled::Done);
    assert_eq!(settle(Write::Complete, 2, &answer(&got)), Settled::Lost);
    for (status, body, transient) in [
        (None, "", true),
        (Some(503), UNAVAILABLE, true),
        (Some(504), "upstream request timeout", true),
        (Some(200), "garbage", false),
    ] {
        let a = Answer {
            status,
            body: body.as_bytes(),
        };
        for w in [Write::Complete, Write::Release] {
            match settle(w, 1, &a) {
                Settled::Retry(_) => assert!(transient, "{body}"),
                Settled::Failed(_) => assert!(!transient, "{body}"),
                other => panic!("{other:?}"),
            }
        }
    }
    // A record that vanished with its lease cannot be completed.
    etcd.expire_lease(lock.lease);
    let got = etcd.call(&complete(&lock, Some(&resp()), 1002, TTL));
    assert_eq!(settle(Write::Complete, 1, &answer(&got)), Settled::Lost);
}

#[test]
fn a_request_gone_during_its_lock_transaction_releases_only_its_own_record() {
    let etcd = FakeEtcd::new();
    let mut leases = LeaseCache::default();
    leases.granted(etcd_lease(&etcd), 0);
    let (flow, next) = LockFlow::start(&REJECT, KEY, FP, 1, 1000, &leases);
    let Next::Send(lock_txn) = next else {
        panic!("the lock transaction")
    };
    // The transaction reaches etcd, but the client has gone before its answer.
    etcd.apply_silently(&lock_txn);
    let (release, meta) = flow.abandon().expect("a lock transaction was out");
    assert_eq!(meta.owner, 1);
    let got = etcd.call(&release);
    assert_eq!(settle(Write::Release, 1, &answer(&got)), Settled::Done);
    assert!(etcd.is_empty(), "freed at once, not after lock_timeout_s");
    // Someone else's lock under the key is left alone.
    let theirs = locked(run(&etcd, &REJECT, 2, FP, 1000, &mut leases).0);
    etcd.call(&release);
    assert_eq!(etcd.mod_revision(&key()), Some(theirs.revision));
    // Before the lock transaction (a lease grant out) there is nothing to release.
    let (flow, _) = LockFlow::start(&REJECT, KEY, FP, 3, 0, &LeaseCache::default());
    assert!(flow.abandon().is_none());
}

fn etcd_lease(etcd: &FakeEtcd) -> i64 {
    let got = etcd.call(&crate::etcd::lease_grant(60));
    crate::etcd::parse_lease_grant(&answer(&got)).unwrap().id
}

#[test]
fn a_lock_transaction_applied_but_unanswered_is_undone() {
    let etcd = FakeEtcd::new();
    let mut leases = LeaseCache::default();
    leases.granted(etcd_lease(&etcd), 0);
    let (mut flow, next) = LockFlow::start(&REJECT, KEY, FP, 1, 1000, &leases);
    let Next::Send(lock_txn) = next else {
        panic!("the lock transaction")
    };
    // etcd applies it, but its answer times out: the request gets the store error...
    etcd.apply_silently(&lock_txn);
    let next = flow.on_answer(&REJECT, &answer(&(None, Vec::new())), 1000, &mut leases);
    assert_eq!(next, Next::Reply(Verdict::Problem(Outcome::StoreError)));
    // ...and the release of what the transaction wrote, so a retry is not a 409.
    let (release, meta) = flow.take_undo().expect("an undo");
    assert_eq!(meta.owner, 1);
    assert!(flow.take_undo().is_none(), "once");
    let got = etcd.call(&release);
    assert_eq!(settle(Write::Release, 1, &answer(&got)), Settled::Done);
    assert!(etcd.is_empty(), "freed at once, not after lock_timeout_s");
    let retry = run(&etcd, &REJECT, 2, FP, 1000, &mut leases).0;
    assert!(
        matches!(retry, Next::Locked(_)),
        "the retry takes the lock: {retry:?}"
    );
}
