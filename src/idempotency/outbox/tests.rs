use super::*;
use crate::etcd::fake::FakeEtcd;
use crate::idempotency::etcd::{complete, release, EtcdLock, LeaseCache, LockFlow, Next, Settings};
use crate::idempotency::machine::Verdict;
use crate::idempotency::record::StoredResponse;
use crate::idempotency::{OnError, Outcome};

const LOCK_MS: u64 = 4000;
const ETCD_MS: u64 = 300;
const TTL: u64 = 86_400_000;

const S: Settings<'static> = Settings {
    prefix: "/p/",
    ttl_s: 86_400,
    lock_timeout_ms: LOCK_MS,
    on_error: OnError::Reject,
};

fn answer(c: &(Option<u16>, Vec<u8>)) -> Answer<'_> {
    Answer {
        status: c.0,
        body: &c.1,
    }
}

fn key(n: u8) -> [u8; 32] {
    [n; 32]
}

/// One request through the lock flow on `etcd` at `now`.
fn lock(etcd: &FakeEtcd, k: u8, owner: u64, now: u64, leases: &mut LeaseCache) -> Next {
    let (mut flow, mut next) = LockFlow::start(&S, key(k), [1; 32], owner, now, leases);
    while let Next::Send(r) = &next {
        next = flow.on_answer(&S, &answer(&etcd.call(r)), now, leases);
    }
    next
}

fn locked(n: Next) -> EtcdLock {
    match n {
        Next::Locked(l) => l,
        other => panic!("{other:?}"),
    }
}

fn resp(n: usize) -> StoredResponse {
    StoredResponse {
        status: 201,
        headers: vec![],
        body: vec![b'x'; n],
    }
}

fn entry(lock: &EtcdLock, now: u64) -> Entry {
    Entry::failed_once(
        Write::Complete,
        lock.meta.owner,
        complete(lock, Some(&resp(10)), now, TTL),
        deadline_ms(&lock.meta, ETCD_MS),
        now,
    )
}

/// One tick: expire, send what is due to `etcd`, settle the answers.
fn tick(q: &mut Outbox, etcd: &FakeEtcd, now: u64, token: &mut u32) -> (Vec<Gone>, Vec<Entry>) {
    let expired = q.expire(now, ETCD_MS + 1000);
    let mut gone = Vec::new();
    let due = q.due(now);
    let mut out = Vec::new();
    for (i, r) in due {
        *token += 1;
        q.sent(i, Some(*token), now);
        out.push((*token, etcd.call(&r)));
    }
    for (t, a) in out {
        if let Some(Answered::Gone(g)) = q.answered(t, &answer(&a), now) {
            gone.push(g);
        }
    }
    (gone, expired)
}

#[test]
fn the_margin_keeps_retries_inside_the_lock() {
    let meta = crate::idempotency::machine::lock_record(key(1), [1; 32], 1, 10_000, 30_000);
    // 30 s lock, 250 ms etcd timeout: retries stop 7.75 s before the lock expires.
    assert_eq!(deadline_ms(&meta, 250), 10_000 + 30_000 - 7_750);
    assert_eq!(margin_ms(2000, 300), 800);
    // A deadline in the past (the app took longer than the lock) gives no retry.
    let late = crate::idempotency::machine::lock_record(key(1), [1; 32], 1, 0, 100);
    assert_eq!(deadline_ms(&late, 250), 0);
}

#[test]
fn a_completion_is_stored_once_etcd_is_back_and_replayed_after() {
    let etcd = FakeEtcd::new();
    let mut leases = LeaseCache::default();
    let l = locked(lock(&etcd, 1, 7, 1000, &mut leases));
    etcd.set_down(true);
    let mut q = Outbox::new(Limits::for_store(65_536), "s".into());
    q.push(entry(&l, 1100)).unwrap();
    let mut token = 0;
    // Down: kept, backing off.
    for now in [1200, 1300, 1500] {
        let (gone, expired) = tick(&mut q, &etcd, now, &mut token);
        assert!(gone.is_empty() && expired.is_empty());
    }
    assert_eq!(q.len(), 1);
    etcd.set_down(false);
    let (gone, _) = tick(&mut q, &etcd, 2500, &mut token);
    assert!(
        matches!(&gone[..], [Gone::Settled(_, Settled::Done)]),
        "{gone:?}"
    );
    assert!(q.is_empty() && q.bytes() == 0);
    // Any Envoy now gets the replay.
    let next = lock(&etcd, 1, 8, 2600, &mut LeaseCache::default());
    assert_eq!(next, Next::Reply(Verdict::Replay(resp(10))));
}

#[test]
fn backoff_doubles_and_gives_up_at_the_deadline() {
    let etcd = FakeEtcd::new();
    let mut leases = LeaseCache::default();
    let l = locked(lock(&etcd, 1, 7, 0, &mut leases));
    etcd.set_down(true);
    let mut q = Outbox::new(Limits::for_store(65_536), "s".into());
    q.push(entry(&l, 0)).unwrap();
    let deadline = deadline_ms(&l.meta, ETCD_MS);
    assert_eq!(deadline, LOCK_MS - ETCD_MS - LOCK_MS / 4);
    let mut token = 0;
    let mut sends = Vec::new();
    let mut expired_at = None;
    for now in (0..=LOCK_MS).step_by(50) {
        let before = token;
        let (_, expired) = tick(&mut q, &etcd, now, &mut token);
        if token > before {
            sends.push(now);
        }
        if !expired.is_empty() {
            expired_at = Some(now);
            break;
        }
    }
    // 100, 200, 400, 800, then 1000 ms apart, and a last attempt at the deadline.
    assert_eq!(sends, vec![100, 300, 700, 1500, 2500, deadline]);
    let expired_at = expired_at.expect("given up");
    assert!(expired_at > deadline && expired_at < l.meta.expires_at_ms);
    // The lock was never completed: a retry after lock_timeout_s takes it over (the
    // documented window), but not before.
    etcd.set_down(false);
    let before = lock(&etcd, 1, 8, l.meta.expires_at_ms - 1, &mut leases);
    assert_eq!(
        before,
        Next::Reply(Verdict::Problem(Outcome::InFlightConflict))
    );
}

#[test]
fn a_takeover_never_wins_against_a_pending_completion() {
    // etcd is down from the app's answer until just before the deadline; another Envoy
    // retries all along (and right at the lock's expiry). The completion lands first, so
    // every retry is a 409 while it is pending and a replay after.
    let etcd = FakeEtcd::new();
    let mut leases = LeaseCache::default();
    let l = locked(lock(&etcd, 1, 7, 0, &mut leases));
    let deadline = deadline_ms(&l.meta, ETCD_MS);
    etcd.set_down(true);
    let mut q = Outbox::new(Limits::for_store(65_536), "s".into());
    q.push(entry(&l, 10)).unwrap();
    let mut token = 0;
    let mut other = LeaseCache::default();
    for now in (0..=l.meta.expires_at_ms + 10).step_by(50) {
        if now >= deadline - 50 {
            etcd.set_down(false);
        }
        tick(&mut q, &etcd, now, &mut token);
        let r = lock(&etcd, 1, 100 + now, now, &mut other);
        match r {
            Next::Reply(Verdict::Problem(Outcome::InFlightConflict))
            | Next::Reply(Verdict::Problem(Outcome::StoreError)) => {
                assert!(!q.is_empty() || etcd.value(&l.key).is_none(), "at {now}")
            }
            Next::Reply(Verdict::Replay(_)) => assert!(q.is_empty()),
            Next::Locked(_) => panic!("taken over at {now} while the completion was pending"),
            other => panic!("{other:?}"),
        }
    }
    assert!(q.is_empty());
    let r = lock(&etcd, 1, 999, l.meta.expires_at_ms + 1000, &mut other);
    assert_eq!(r, Next::Reply(Verdict::Replay(resp(10))));
}

#[test]
fn a_takeover_after_the_deadline_makes_the_completion_lost_not_stored() {
    // The window the margin leaves: the completion is sent once more at the deadline but its
    // answer never comes back; a takeover later wins, and the retried completion must not
    // overwrite the new owner's lock.
    let etcd = FakeEtcd::new();
    let mut leases = LeaseCache::default();
    let l = locked(lock(&etcd, 1, 7, 0, &mut leases));
    let taker = locked(lock(&etcd, 1, 8, l.meta.expires_at_ms, &mut leases));
    let mut q = Outbox::new(Limits::for_store(65_536), "s".into());
    let mut e = entry(&l, 0);
    e.deadline_ms = u64::MAX;
    q.push(e).unwrap();
    let mut token = 0;
    let (gone, _) = tick(&mut q, &etcd, 200, &mut token);
    assert!(matches!(&gone[..], [Gone::Settled(_, Settled::Lost)]));
    assert_eq!(
        etcd.mod_revision(&l.key),
        Some(taker.revision),
        "the taker keeps the lock"
    );
}

#[test]
fn a_timed_out_attempt_that_etcd_applied_counts_as_stored() {
    let etcd = FakeEtcd::new();
    let mut leases = LeaseCache::default();
    let l = locked(lock(&etcd, 1, 7, 0, &mut leases));
    let e = entry(&l, 0);
    etcd.apply_silently(&e.request);
    let mut q = Outbox::new(Limits::for_store(65_536), "s".into());
    q.push(e).unwrap();
    let (gone, _) = tick(&mut q, &etcd, 100, &mut 0);
    assert!(matches!(&gone[..], [Gone::Settled(_, Settled::Done)]));
}

#[test]
fn releases_are_retried_too() {
    let etcd = FakeEtcd::new();
    let mut leases = LeaseCache::default();
    let l = locked(lock(&etcd, 1, 7, 0, &mut leases));
    let mut q = Outbox::new(Limits::for_store(65_536), "s".into());
    q.push(Entry::unsent(
        Write::Release,
        7,
        release(&l),
        deadline_ms(&l.meta, ETCD_MS),
        0,
    ))
    .unwrap();
    etcd.set_down(true);
    assert!(
        tick(&mut q, &etcd, 0, &mut 0).0.is_empty(),
        "sent at once, failed"
    );
    etcd.set_down(false);
    let (gone, _) = tick(&mut q, &etcd, 100, &mut 1);
    assert!(matches!(&gone[..], [Gone::Settled(_, Settled::Done)]));
    assert!(etcd.is_empty(), "the key is free: a retry executes at once");
}

#[test]
fn bounded_by_entries_and_bytes() {
    let limits = Limits {
        max_entries: 3,
        max_bytes: 10_000,
    };
    let etcd = FakeEtcd::new();
    let mut leases = LeaseCache::default();
    let mut q = Outbox::new(limits, "s".into());
    for k in 0..3 {
        let l = locked(lock(&etcd, k, 7, 0, &mut leases));
        q.push(entry(&l, 0)).unwrap();
    }
    let l = locked(lock(&etcd, 9, 7, 0, &mut leases));
    assert!(q.push(entry(&l, 0)).is_err(), "a fourth entry is refused");
    assert_eq!(q.len(), 3);
    // Bytes: one large completion fills it.
    let mut q = Outbox::new(Limits::for_store(1000), "s".into());
    let big = Entry::failed_once(
        Write::Complete,
        7,
        complete(&l, Some(&resp(1000)), 0, TTL),
        u64::MAX,
        0,
    );
    let mut n = 0;
    while q.push(big.clone()).is_ok() {
        n += 1;
        assert!(q.bytes() <= Limits::for_store(1000).max_bytes);
    }
    assert!(
        (PENDING_FULL_SIZE..PENDING_FULL_SIZE + 8).contains(&n),
        "room for about the documented number of full-size records: {n}"
    );
    // The default store: at most a few MiB per worker.
    assert!(Limits::for_store(65_536).max_bytes < 6 * 1024 * 1024);
}

#[test]
fn sent_oldest_first_and_at_most_per_tick() {
    let etcd = FakeEtcd::new();
    let mut leases = LeaseCache::default();
    let mut q = Outbox::new(Limits::for_store(65_536), "s".into());
    let mut locks = Vec::new();
    for k in 0..(PER_TICK as u8 + 4) {
        let l = locked(lock(&etcd, k, u64::from(k) + 1, 0, &mut leases));
        q.push(entry(&l, 0)).unwrap();
        locks.push(l);
    }
    let due = q.due(100);
    assert_eq!(due.len(), PER_TICK);
    for ((i, r), l) in due.iter().zip(&locks) {
        assert_eq!(*r, q.entries[*i].request);
        assert_eq!(q.entries[*i].owner, l.meta.owner, "in the order queued");
    }
    let mut token = 0;
    let (gone, _) = tick(&mut q, &etcd, 100, &mut token);
    assert_eq!(gone.len(), PER_TICK);
    let (gone, _) = tick(&mut q, &etcd, 100, &mut token);
    assert_eq!(gone.len(), 4);
}

#[test]
fn an_answer_lost_with_its_context_is_sent_again() {
    let etcd = FakeEtcd::new();
    let mut leases = LeaseCache::default();
    let l = locked(lock(&etcd, 1, 7, 0, &mut leases));
    let mut q = Outbox::new(Limits::for_store(65_536), "s".into());
    q.push(entry(&l, 0)).unwrap();
    let due = q.due(100);
    q.sent(due[0].0, Some(1), 100);
    assert!(q.due(200).is_empty(), "in flight");
    assert!(q.expire(100 + ETCD_MS + 1001, ETCD_MS + 1000).is_empty());
    assert_eq!(
        q.due(100 + ETCD_MS + 1001 + MAX_BACKOFF_MS).len(),
        1,
        "re-armed"
    );
    // A dispatch that fails counts as an attempt.
    q.sent(0, None, 5000);
    assert!(q.due(5000).is_empty());
    // An answer to a callout that is not ours changes nothing.
    assert_eq!(
        q.answered(
            42,
            &Answer {
                status: Some(200),
                body: b"{}"
            },
            0
        ),
        None
    );
}

#[test]
fn a_configuration_update_keeps_the_queue_for_the_same_store() {
    let etcd = FakeEtcd::new();
    let mut leases = LeaseCache::default();
    let l = locked(lock(&etcd, 1, 7, 0, &mut leases));
    let mut q = Outbox::new(Limits::for_store(65_536), "etcd|etcd|/p/".into());
    q.push(entry(&l, 0)).unwrap();
    assert!(q
        .configure(Limits::for_store(1000), "etcd|etcd|/p/")
        .is_empty());
    assert_eq!(q.len(), 1);
    let dropped = q.configure(Limits::for_store(1000), "other|etcd|/p/");
    assert_eq!((dropped.len(), q.len(), q.bytes()), (1, 0, 0));
}
