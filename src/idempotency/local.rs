//! The local store: a fixed table of `max_entries` slots in Envoy's shared data, common to all
//! worker threads of one Envoy.
//!
//! Shared data has compare-and-swap but no delete and no eviction, so slots are overwritten in
//! place, never added beyond `max_entries`: memory is at most `max_entries` × (90-byte meta +
//! one stored response of at most `max_response_bytes`), whatever the number of distinct keys.
//!
//! Slots are created on demand, one at a time, when a key's bucket has no reusable slot left but
//! a slot never written (so starting the filter writes nothing but one guard entry, and an idle
//! table costs nothing).
//! A CAS on a missing shared-data entry always succeeds, so two workers must never write a
//! missing slot at the same time: creation happens only under the guard (a lock record taken
//! with a CAS on an entry that exists from `on_configure`), and re-checks each slot under it.
//!
//! A key hashes to a bucket of [`BUCKET`] consecutive slots. A lookup reads the bucket's metas;
//! a record with the key decides the request; otherwise the first reusable slot (free, expired
//! or an abandoned lock) is taken with a CAS, so two workers racing for one key get exactly
//! one winner. When every slot of the bucket holds a live key the store is full for that key.

use super::machine::{completed_record, decide, lock_record, Decision};
use super::record::{Meta, State, StoredResponse};
use crate::shared::{update, SharedData, Step, Update};

/// Candidate slots per key.
pub const BUCKET: u32 = 8;
/// Lookups retried after losing a CAS race before answering 409.
const ATTEMPTS: usize = 4;
/// Tries to take the creation guard (held for a few shared-data calls by another worker).
const GUARD_ATTEMPTS: usize = 64;
/// A guard older than this was abandoned (its worker died while creating slots).
const GUARD_TIMEOUT_MS: u64 = 1000;

/// The free guard. Never empty: the host reads an empty shared-data value as missing.
const GUARD_FREE: [u8; 16] = [0; 16];

/// The guard's value: held by `owner` (never 0) since `at_ms`.
fn guard_value(owner: u64, at_ms: u64) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&owner.to_be_bytes());
    v[8..].copy_from_slice(&at_ms.to_be_bytes());
    v
}

fn guard_free(value: &[u8], now_ms: u64) -> bool {
    if value.len() != 16 || value == GUARD_FREE {
        return true;
    }
    let at = u64::from_be_bytes(value[8..].try_into().unwrap_or([0; 8]));
    now_ms.saturating_sub(at) >= GUARD_TIMEOUT_MS
}

/// The outcome of looking a key up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// The lock is ours: forward. `was_free` is true when the slot held no record before
    /// (for the occupancy gauge).
    Locked { lock: LocalLock, was_free: bool },
    /// Not forwarded: the record found decides (in flight, mismatch, replay, not replayable).
    Found {
        decision: Decision,
        slot: u32,
        meta: Meta,
    },
    /// Every slot of the key's bucket holds a live key.
    Full,
    /// Lost the CAS race `ATTEMPTS` times: answered as in flight.
    Contended,
}

/// The lock a forwarded request holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalLock {
    pub slot: u32,
    pub meta: Meta,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalStore {
    pub max_entries: u32,
}

/// What one read of a key's bucket found.
#[derive(Default)]
struct Scan {
    /// A record of the key: its slot, meta and CAS token.
    found: Option<(u32, Meta, Option<u32>)>,
    /// The first slot another key may take (free, expired, abandoned or unreadable): its
    /// slot, token, and whether it held no record.
    reusable: Option<(u32, Option<u32>, bool)>,
    /// The first slot never written.
    missing: Option<u32>,
}

/// One lookup attempt's end: decided, or lost a race and must look again.
enum Attempt {
    Done(Begin),
    Again,
}

impl LocalStore {
    /// The bucket of a key: `min(BUCKET, max_entries)` consecutive slots, wrapping.
    pub fn bucket(&self, key: &[u8; 32]) -> impl Iterator<Item = u32> {
        let n = self.max_entries.max(1);
        let start = u32::from_be_bytes([key[0], key[1], key[2], key[3]]) % n;
        (0..BUCKET.min(n)).map(move |i| (start + i) % n)
    }

    /// The shared-data keys. The table size is part of the names, so a resized table never
    /// reads the old one's records.
    fn meta_key(&self, slot: u32) -> String {
        format!("handoff.idem.{}.m{slot}", self.max_entries)
    }

    fn response_key(&self, slot: u32) -> String {
        format!("handoff.idem.{}.r{slot}", self.max_entries)
    }

    fn guard_key(&self) -> String {
        format!("handoff.idem.{}.guard", self.max_entries)
    }

    fn meta(&self, shared: &dyn SharedData, slot: u32) -> (Option<Vec<u8>>, Option<u32>) {
        shared.get(&self.meta_key(slot))
    }

    fn set_meta(&self, shared: &dyn SharedData, slot: u32, v: &[u8], cas: Option<u32>) -> bool {
        shared.set(&self.meta_key(slot), v, cas).is_ok()
    }

    /// Creates the creation guard unless it exists. Run when the filter is configured, before
    /// requests arrive. Writes no slot.
    pub fn prepare(&self, shared: &dyn SharedData) -> bool {
        let key = self.guard_key();
        if shared.get(&key).0.is_some() {
            return false;
        }
        shared.set(&key, &GUARD_FREE, None).is_ok()
    }

    /// Takes the creation guard: its CAS token once ours, `None` when another worker kept it
    /// for all of [`GUARD_ATTEMPTS`] or it does not exist.
    fn take_guard(&self, shared: &dyn SharedData, owner: u64, now_ms: u64) -> Option<u32> {
        let key = self.guard_key();
        let mine = guard_value(owner.max(1), now_ms);
        // A held guard is waited for (its holder needs a few shared-data calls); each try is
        // one compare-and-swap.
        for _ in 0..GUARD_ATTEMPTS {
            let taken = update(shared, &key, 1, |v| match v {
                // No guard (configure did not run): never write a missing slot unguarded.
                None => Step::Keep(Some(false)),
                Some(v) if guard_free(v, now_ms) => Step::Write(mine.to_vec(), Some(true)),
                Some(_) => Step::Keep(None),
            });
            match taken {
                Update::Written(_) => return shared.get(&key).1,
                Update::Unchanged(Some(false)) => return None,
                _ => {}
            }
        }
        None
    }

    /// Creates a slot never written as free, under the guard. `false` when the guard could not
    /// be taken (another worker holds it): nothing was written.
    fn create_slot(&self, shared: &dyn SharedData, slot: u32, owner: u64, now_ms: u64) -> bool {
        let Some(cas) = self.take_guard(shared, owner, now_ms) else {
            return false;
        };
        // Re-checked under the guard: another worker may have created (and locked) it since
        // our lookup.
        if self.meta(shared, slot).0.is_none() {
            self.set_meta(shared, slot, &Meta::free().encode(), None);
        }
        // Released only if still ours (an expired guard may have been taken over meanwhile).
        let _ = shared.set(&self.guard_key(), &GUARD_FREE, Some(cas));
        true
    }

    /// Reads the key's bucket.
    fn scan(&self, shared: &dyn SharedData, key: &[u8; 32], now_ms: u64) -> Scan {
        let mut scan = Scan::default();
        for slot in self.bucket(key) {
            let (value, cas) = self.meta(shared, slot);
            let Some(value) = value else {
                scan.missing = scan.missing.or(Some(slot));
                continue;
            };
            match Meta::decode(&value) {
                Some(m) if m.key == *key && m.state != State::Free => {
                    scan.found = Some((slot, m, cas));
                    return scan;
                }
                Some(m) if !m.is_live(now_ms) => {
                    let free = m.state == State::Free;
                    scan.reusable = scan.reusable.or(Some((slot, cas, free)));
                }
                Some(_) => {}
                None => scan.reusable = scan.reusable.or(Some((slot, cas, true))),
            }
        }
        scan
    }

    /// Looks the key up and takes its lock when the request is to be forwarded.
    pub fn begin(
        &self,
        shared: &dyn SharedData,
        key: [u8; 32],
        fingerprint: [u8; 32],
        owner: u64,
        now_ms: u64,
        lock_timeout_ms: u64,
    ) -> Begin {
        let lock = LocalLock {
            slot: 0,
            meta: lock_record(key, fingerprint, owner, now_ms, lock_timeout_ms),
        };
        for _ in 0..ATTEMPTS {
            if let Attempt::Done(b) = self.attempt(shared, &lock, now_ms) {
                return b;
            }
        }
        Begin::Contended
    }

    /// One lookup: the key's record decides, else a reusable slot is locked, else a slot is
    /// created.
    fn attempt(&self, shared: &dyn SharedData, lock: &LocalLock, now_ms: u64) -> Attempt {
        let key = &lock.meta.key;
        let mut scan = self.scan(shared, key, now_ms);
        if let Some((slot, meta, cas)) = scan.found {
            return self.on_record(shared, lock, slot, meta, cas, now_ms);
        }
        if let (None, Some(slot)) = (scan.reusable, scan.missing) {
            // No slot to reuse yet: create one and take it while it is free. A record of the
            // key that another worker wrote meanwhile into another new slot is found after
            // locking (below), as for any two racing lookups.
            if !self.create_slot(shared, slot, lock.meta.owner, now_ms) {
                return Attempt::Done(Begin::Contended);
            }
            let (value, cas) = self.meta(shared, slot);
            match value.as_deref().and_then(Meta::decode) {
                Some(m) if m.state == State::Free => scan.reusable = Some((slot, cas, true)),
                _ => return Attempt::Again,
            }
        }
        match scan.reusable {
            Some((slot, cas, was_free)) => {
                self.take_slot(shared, lock, slot, cas, was_free, now_ms)
            }
            None => Attempt::Done(Begin::Full),
        }
    }

    /// The key has a record in `slot`: it decides, or its lock is ours to take.
    fn on_record(
        &self,
        shared: &dyn SharedData,
        lock: &LocalLock,
        slot: u32,
        meta: Meta,
        cas: Option<u32>,
        now_ms: u64,
    ) -> Attempt {
        match decide(Some(&meta), &lock.meta.fingerprint, now_ms) {
            Decision::Acquire | Decision::TakeOver => {
                if !self.set_meta(shared, slot, &lock.meta.encode(), cas) {
                    return Attempt::Again;
                }
                Attempt::Done(Begin::Locked {
                    lock: LocalLock {
                        slot,
                        meta: lock.meta.clone(),
                    },
                    was_free: false,
                })
            }
            decision => Attempt::Done(Begin::Found {
                decision,
                slot,
                meta,
            }),
        }
    }

    /// Locks a slot that holds no live record.
    fn take_slot(
        &self,
        shared: &dyn SharedData,
        lock: &LocalLock,
        slot: u32,
        cas: Option<u32>,
        was_free: bool,
        now_ms: u64,
    ) -> Attempt {
        if !self.set_meta(shared, slot, &lock.meta.encode(), cas) {
            return Attempt::Again;
        }
        let mine = LocalLock {
            slot,
            meta: lock.meta.clone(),
        };
        // Two requests with one key that saw different free slots (another key freed one
        // between their lookups) could each lock a slot. Whoever finds the other's record
        // after locking gives way, so at most one of them is forwarded.
        let Some((slot, meta)) = self.other_record(shared, &lock.meta.key, slot, now_ms) else {
            return Attempt::Done(Begin::Locked {
                lock: mine,
                was_free,
            });
        };
        self.release(shared, &mine);
        Attempt::Done(match decide(Some(&meta), &lock.meta.fingerprint, now_ms) {
            Decision::Acquire | Decision::TakeOver => Begin::Contended,
            decision => Begin::Found {
                decision,
                slot,
                meta,
            },
        })
    }

    fn other_record(
        &self,
        shared: &dyn SharedData,
        key: &[u8; 32],
        mine: u32,
        now_ms: u64,
    ) -> Option<(u32, Meta)> {
        self.bucket(key).filter(|s| *s != mine).find_map(|slot| {
            let meta = self
                .meta(shared, slot)
                .0
                .as_deref()
                .and_then(Meta::decode)?;
            (meta.key == *key && meta.is_live(now_ms)).then_some((slot, meta))
        })
    }

    /// Replaces our lock in its slot with `value` if the slot still holds it (same key and
    /// owner, in flight). `before` runs once the lock is seen, before the write. `false` when
    /// the lock was lost or every attempt lost its race.
    fn replace_lock(
        &self,
        shared: &dyn SharedData,
        lock: &LocalLock,
        value: &[u8],
        before: &dyn Fn(),
    ) -> bool {
        let ours = |v: Option<&[u8]>| {
            v.and_then(Meta::decode).is_some_and(|m| {
                m.state == State::InFlight && m.key == lock.meta.key && m.owner == lock.meta.owner
            })
        };
        let out = update(shared, &self.meta_key(lock.slot), ATTEMPTS, |v| {
            if ours(v) {
                before();
                Step::Write(value.to_vec(), true)
            } else {
                Step::Keep(false)
            }
        });
        matches!(out, Update::Written(true))
    }

    /// Stores the outcome of a forwarded request: the response when it is given (it fits
    /// `max_response_bytes`), else the key stays completed without a response. `false` when
    /// the lock was lost (taken over after `lock_timeout_s`): nothing is written.
    pub fn complete(
        &self,
        shared: &dyn SharedData,
        lock: &LocalLock,
        response: Option<&StoredResponse>,
        now_ms: u64,
        ttl_ms: u64,
    ) -> bool {
        let done = completed_record(&lock.meta, response.is_some(), now_ms, ttl_ms).encode();
        let tagged = response.map(|r| tagged_response(&lock.meta, r));
        self.replace_lock(shared, lock, &done, &|| {
            if let Some(t) = &tagged {
                // The response entry first, tagged with key and owner: a reader that sees
                // the completed meta always finds its response.
                let _ = shared.set(&self.response_key(lock.slot), t, None);
            }
        })
    }

    /// Frees the slot if it still holds our lock (5xx, reset, timeout): a retry executes
    /// again. `true` when the slot was freed.
    pub fn release(&self, shared: &dyn SharedData, lock: &LocalLock) -> bool {
        self.replace_lock(shared, lock, &Meta::free().encode(), &|| {})
    }

    /// The stored response of a completed record found by [`LocalStore::begin`].
    pub fn response(
        &self,
        shared: &dyn SharedData,
        slot: u32,
        meta: &Meta,
    ) -> Option<StoredResponse> {
        let bytes = shared.get(&self.response_key(slot)).0?;
        if bytes.len() < 40 {
            return None;
        }
        let (tag, rest) = bytes.split_at(40);
        (tag[..32] == meta.key && tag[32..] == meta.owner.to_be_bytes())
            .then(|| StoredResponse::decode(rest))
            .flatten()
    }
}

fn tagged_response(meta: &Meta, r: &StoredResponse) -> Vec<u8> {
    let mut out = Vec::with_capacity(40 + r.encoded_len());
    out.extend_from_slice(&meta.key);
    out.extend_from_slice(&meta.owner.to_be_bytes());
    out.extend_from_slice(&r.encode());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::{Memory, WriteError};
    use proptest::prelude::*;

    const FP: [u8; 32] = [1; 32];
    const TIMEOUT: u64 = 30_000;
    const TTL: u64 = 86_400_000;

    fn key(n: u32) -> [u8; 32] {
        let mut k = [0u8; 32];
        k[4..8].copy_from_slice(&n.to_be_bytes());
        k
    }

    /// Slot-level access to the shared data of a store, for the tests.
    trait Slots {
        fn store(&self) -> LocalStore;
        fn shared(&self) -> &dyn SharedData;
        fn get_meta(&self, slot: u32) -> (Option<Vec<u8>>, Option<u32>) {
            self.store().meta(self.shared(), slot)
        }
        fn set_meta(&self, slot: u32, v: &[u8], cas: Option<u32>) -> bool {
            self.store().set_meta(self.shared(), slot, v, cas)
        }
        fn get_guard(&self) -> (Option<Vec<u8>>, Option<u32>) {
            self.shared().get(&self.store().guard_key())
        }
        fn set_guard(&self, v: &[u8]) {
            self.shared()
                .set(&self.store().guard_key(), v, None)
                .unwrap();
        }
    }

    struct Table {
        store: LocalStore,
        mem: Memory,
    }

    impl Slots for Table {
        fn store(&self) -> LocalStore {
            self.store
        }
        fn shared(&self) -> &dyn SharedData {
            &self.mem
        }
    }

    impl SharedData for Table {
        fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
            self.mem.get(key)
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), WriteError> {
            self.mem.set(key, value, cas)
        }
    }

    impl Table {
        /// Slots written so far.
        fn metas(&self) -> usize {
            self.mem.keys().iter().filter(|k| k.contains(".m")).count()
        }
        fn responses(&self) -> usize {
            self.mem.keys().iter().filter(|k| k.contains(".r")).count()
        }
    }

    fn store(n: u32) -> (LocalStore, Table) {
        let s = LocalStore { max_entries: n };
        let slots = Table {
            store: s,
            mem: Memory::new(),
        };
        assert!(s.prepare(&slots));
        assert!(!s.prepare(&slots), "preparation is idempotent");
        assert_eq!(slots.metas(), 0, "no slot before first use");
        (s, slots)
    }

    /// A store whose every slot exists already (as after heavy use).
    fn created(n: u32) -> (LocalStore, Table) {
        let (s, slots) = store(n);
        for slot in 0..n {
            slots.set_meta(slot, &Meta::free().encode(), None);
        }
        (s, slots)
    }

    fn lock_of(b: Begin) -> LocalLock {
        match b {
            Begin::Locked { lock, .. } => lock,
            other => panic!("expected a lock, got {other:?}"),
        }
    }

    fn decision_of(b: Begin) -> Decision {
        match b {
            Begin::Found { decision, .. } => decision,
            other => panic!("expected a record, got {other:?}"),
        }
    }

    fn resp() -> StoredResponse {
        StoredResponse {
            status: 201,
            headers: vec![("content-type".into(), "application/json".into())],
            body: b"{\"id\":\"tx-1\"}".to_vec(),
        }
    }

    #[test]
    fn first_in_flight_replay_mismatch() {
        let (s, slots) = store(16);
        let k = key(1);
        let lock = lock_of(s.begin(&slots, k, FP, 7, 1000, TIMEOUT));
        assert_eq!(
            decision_of(s.begin(&slots, k, FP, 8, 1001, TIMEOUT)),
            Decision::InFlight
        );
        assert_eq!(
            decision_of(s.begin(&slots, k, [2; 32], 8, 1001, TIMEOUT)),
            Decision::Mismatch
        );
        assert!(s.complete(&slots, &lock, Some(&resp()), 1002, TTL));
        match s.begin(&slots, k, FP, 9, 1003, TIMEOUT) {
            Begin::Found {
                decision: Decision::Replay,
                slot,
                meta,
            } => assert_eq!(s.response(&slots, slot, &meta), Some(resp())),
            other => panic!("{other:?}"),
        }
        // Expired after the TTL: a new operation.
        lock_of(s.begin(&slots, k, FP, 10, 1002 + TTL, TIMEOUT));
    }

    #[test]
    fn release_lets_a_retry_execute_and_only_the_owner_releases() {
        let (s, slots) = store(16);
        let k = key(2);
        let lock = lock_of(s.begin(&slots, k, FP, 7, 1000, TIMEOUT));
        let mut impostor = lock.clone();
        impostor.meta.owner = 99;
        assert!(!s.release(&slots, &impostor));
        assert!(s.release(&slots, &lock));
        assert!(!s.release(&slots, &lock), "released once");
        lock_of(s.begin(&slots, k, FP, 8, 1001, TIMEOUT));
    }

    #[test]
    fn abandoned_lock_is_taken_over_and_the_old_owner_cannot_complete() {
        let (s, slots) = store(16);
        let k = key(3);
        let old = lock_of(s.begin(&slots, k, FP, 7, 1000, TIMEOUT));
        let new = lock_of(s.begin(&slots, k, FP, 8, 1000 + TIMEOUT, TIMEOUT));
        assert_eq!(new.slot, old.slot);
        assert!(!s.complete(&slots, &old, Some(&resp()), 1000 + TIMEOUT, TTL));
        assert!(s.complete(&slots, &new, Some(&resp()), 1000 + TIMEOUT, TTL));
    }

    #[test]
    fn oversized_response_completes_without_a_body() {
        let (s, slots) = store(16);
        let k = key(4);
        let lock = lock_of(s.begin(&slots, k, FP, 7, 1000, TIMEOUT));
        assert!(s.complete(&slots, &lock, None, 1001, TTL));
        assert_eq!(
            decision_of(s.begin(&slots, k, FP, 8, 1002, TIMEOUT)),
            Decision::NotReplayable
        );
    }

    #[test]
    fn full_bucket_then_expired_slots_are_reused_first() {
        let (s, slots) = store(4);
        for i in 0..4 {
            lock_of(s.begin(&slots, key(10 + i), FP, 1, 1000, TIMEOUT));
        }
        assert_eq!(s.begin(&slots, key(20), FP, 1, 1001, TIMEOUT), Begin::Full);
        // After the lock timeout the abandoned slots are reusable.
        lock_of(s.begin(&slots, key(20), FP, 1, 1000 + TIMEOUT, TIMEOUT));
        assert_eq!(slots.metas(), 4, "never more than max_entries");
    }

    #[test]
    fn a_lost_cas_race_finds_the_winner() {
        // Worker B read the bucket before worker A locked; B's CAS with the stale token fails
        // and its retry finds A's lock.
        let (s, slots) = created(8);
        let k = key(5);
        let slot = s.bucket(&k).next().unwrap();
        let (_, stale) = slots.get_meta(slot);
        lock_of(s.begin(&slots, k, FP, 1, 1000, TIMEOUT));
        assert!(!slots.set_meta(slot, &Meta::free().encode(), stale));
        assert_eq!(
            decision_of(s.begin(&slots, k, FP, 2, 1000, TIMEOUT)),
            Decision::InFlight
        );
    }

    #[test]
    fn a_record_later_in_the_bucket_wins_over_an_earlier_reusable_slot() {
        let (s, slots) = store(8);
        let k = key(6);
        let mut b = s.bucket(&k);
        let (first, second) = (b.next().unwrap(), b.next().unwrap());
        slots.set_meta(second, &lock_record(k, FP, 1, 1000, TIMEOUT).encode(), None);
        slots.set_meta(first, &lock_record(key(99), FP, 3, 1000, 1).encode(), None);
        match s.begin(&slots, k, FP, 2, 1001, TIMEOUT) {
            Begin::Found {
                decision: Decision::InFlight,
                slot,
                ..
            } => assert_eq!(slot, second),
            other => panic!("{other:?}"),
        }
    }

    /// Slots where another worker writes a record right before our first meta write (or, with
    /// `at_guard`, our first look at the creation guard).
    struct Racing {
        inner: Table,
        inject: std::cell::RefCell<Option<(u32, Vec<u8>)>>,
        at_guard: bool,
    }

    impl Racing {
        fn race(&self) {
            if let Some((s, v)) = self.inject.borrow_mut().take() {
                self.inner.set_meta(s, &v, None);
            }
        }
    }

    impl SharedData for Racing {
        fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
            if self.at_guard && key.ends_with("guard") {
                self.race();
            }
            self.inner.get(key)
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), WriteError> {
            if !self.at_guard && key.contains(".m") {
                self.race();
            }
            self.inner.set(key, value, cas)
        }
    }

    impl Slots for Racing {
        fn store(&self) -> LocalStore {
            self.inner.store
        }
        fn shared(&self) -> &dyn SharedData {
            self
        }
    }

    #[test]
    fn a_duplicate_lock_in_another_slot_gives_way() {
        let (s, inner) = created(8);
        let k = key(6);
        let second = s.bucket(&k).nth(1).unwrap();
        let theirs = lock_record(k, FP, 1, 1000, TIMEOUT).encode();
        let slots = Racing {
            inner,
            inject: std::cell::RefCell::new(Some((second, theirs))),
            at_guard: false,
        };
        match s.begin(&slots, k, FP, 2, 1000, TIMEOUT) {
            Begin::Found {
                decision: Decision::InFlight,
                slot,
                meta,
            } => assert_eq!((slot, meta.owner), (second, 1)),
            other => panic!("{other:?}"),
        }
        // Our own slot was given back.
        let first = s.bucket(&k).next().unwrap();
        let m = Meta::decode(&slots.get_meta(first).0.unwrap()).unwrap();
        assert_eq!(m.state, State::Free);
    }

    #[test]
    fn slots_are_created_one_at_a_time_when_none_is_reusable() {
        let (s, slots) = store(10_000);
        let k = key(11);
        let lock = lock_of(s.begin(&slots, k, FP, 1, 1000, TIMEOUT));
        assert_eq!(slots.metas(), 1);
        assert_eq!(s.bucket(&k).next(), Some(lock.slot));
        // The guard was released.
        assert_eq!(slots.get_guard().0.as_deref(), Some(&GUARD_FREE[..]));
        // A live key in the bucket: the next key gets a new slot.
        let mut other = key(11);
        other[31] = 1;
        let second = lock_of(s.begin(&slots, other, FP, 2, 1000, TIMEOUT));
        assert_eq!(s.bucket(&k).nth(1), Some(second.slot));
        // A released slot is reused before another is created.
        assert!(s.release(&slots, &second));
        other[31] = 2;
        assert_eq!(
            lock_of(s.begin(&slots, other, FP, 3, 1000, TIMEOUT)).slot,
            second.slot
        );
        assert_eq!(slots.metas(), 2);
    }

    #[test]
    fn a_guard_held_by_another_worker_writes_nothing_until_it_expires() {
        let (s, slots) = store(64);
        slots.set_guard(&guard_value(42, 1000));
        assert_eq!(
            s.begin(&slots, key(12), FP, 1, 1000, TIMEOUT),
            Begin::Contended
        );
        assert_eq!(slots.metas(), 0);
        // Its worker died while holding it: taken over after GUARD_TIMEOUT_MS.
        lock_of(s.begin(&slots, key(12), FP, 1, 1000 + GUARD_TIMEOUT_MS, TIMEOUT));
    }

    #[test]
    fn without_a_guard_no_missing_slot_is_written() {
        let s = LocalStore { max_entries: 64 };
        let slots = Table {
            store: s,
            mem: Memory::new(),
        };
        assert_eq!(
            s.begin(&slots, key(13), FP, 1, 1000, TIMEOUT),
            Begin::Contended
        );
        assert_eq!(slots.metas(), 0);
    }

    #[test]
    fn creation_never_overwrites_a_slot_created_meanwhile() {
        let (s, inner) = store(64);
        let k = key(14);
        let first = s.bucket(&k).next().unwrap();
        let theirs = lock_record(k, FP, 1, 1000, TIMEOUT).encode();
        // Another worker creates the bucket and locks the key between our lookup and our
        // taking the guard.
        let slots = Racing {
            inner,
            inject: std::cell::RefCell::new(Some((first, theirs))),
            at_guard: true,
        };
        assert_eq!(
            decision_of(s.begin(&slots, k, FP, 2, 1000, TIMEOUT)),
            Decision::InFlight
        );
        let m = Meta::decode(&slots.get_meta(first).0.unwrap()).unwrap();
        assert_eq!((m.state, m.owner), (State::InFlight, 1));
    }

    #[test]
    fn a_response_of_another_owner_is_never_returned() {
        let (s, slots) = store(8);
        let k = key(7);
        let lock = lock_of(s.begin(&slots, k, FP, 1, 1000, TIMEOUT));
        assert!(s.complete(&slots, &lock, Some(&resp()), 1000, TTL));
        let mut other = lock.meta.clone();
        other.owner = 2;
        assert_eq!(s.response(&slots, lock.slot, &other), None);
        other.owner = 1;
        other.key = key(8);
        assert_eq!(s.response(&slots, lock.slot, &other), None);
    }

    proptest! {
        /// Whatever the keys and times, the table never grows past max_entries, and a key
        /// that is locked is never locked a second time while live.
        #[test]
        fn bounded_and_exclusive(ops in proptest::collection::vec((0u32..40, 0u64..5, any::<bool>()), 1..200)) {
            let (s, slots) = store(16);
            let mut now = 0u64;
            let mut held: std::collections::HashMap<u32, (LocalLock, u64)> = Default::default();
            for (k, dt, finish) in ops {
                now += dt * 10_000;
                match s.begin(&slots, key(k), FP, now + 1, now, TIMEOUT) {
                    Begin::Locked { lock, .. } => {
                        if let Some((_, exp)) = held.get(&k) {
                            prop_assert!(*exp <= now, "key {} locked twice while live", k);
                        }
                        if finish {
                            prop_assert!(s.complete(&slots, &lock, Some(&resp()), now, 25_000));
                            held.insert(k, (lock, now + 25_000));
                        } else {
                            held.insert(k, (lock, now + TIMEOUT));
                        }
                    }
                    Begin::Found { decision, .. } => {
                        prop_assert!(matches!(decision, Decision::InFlight | Decision::Replay));
                    }
                    Begin::Full | Begin::Contended => {}
                }
                prop_assert!(slots.metas() <= 16);
                prop_assert!(slots.responses() <= 16);
            }
        }
    }
}
