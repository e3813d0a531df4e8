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

/// Candidate slots per key.
pub const BUCKET: u32 = 8;
/// Lookups retried after losing a CAS race before answering 409.
const ATTEMPTS: usize = 4;
/// Tries to take the creation guard (held for a few shared-data calls by another worker).
const GUARD_ATTEMPTS: usize = 64;
/// A guard older than this was abandoned (its worker died while creating slots).
const GUARD_TIMEOUT_MS: u64 = 1000;

/// Shared-data access, by slot number. The filter implements it over the host; tests over a
/// map.
pub trait Slots {
    /// The meta entry of a slot and its CAS token (`None` for a slot never written).
    fn get_meta(&self, slot: u32) -> (Option<Vec<u8>>, Option<u32>);
    /// Writes the meta entry if its CAS token is still `cas`. `false` on a CAS mismatch.
    fn set_meta(&self, slot: u32, value: &[u8], cas: Option<u32>) -> bool;
    fn get_response(&self, slot: u32) -> Option<Vec<u8>>;
    fn set_response(&self, slot: u32, value: &[u8]);
    /// The creation guard entry and its CAS token (`None` before [`LocalStore::prepare`]).
    fn get_guard(&self) -> (Option<Vec<u8>>, Option<u32>);
    /// Writes the guard if its CAS token is still `cas`. `false` on a CAS mismatch.
    fn set_guard(&self, value: &[u8], cas: Option<u32>) -> bool;
}

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

impl LocalStore {
    /// The bucket of a key: `min(BUCKET, max_entries)` consecutive slots, wrapping.
    pub fn bucket(&self, key: &[u8; 32]) -> impl Iterator<Item = u32> {
        let n = self.max_entries.max(1);
        let start = u32::from_be_bytes([key[0], key[1], key[2], key[3]]) % n;
        (0..BUCKET.min(n)).map(move |i| (start + i) % n)
    }

    /// Creates the creation guard unless it exists. Run when the filter is configured, before
    /// requests arrive. Writes no slot.
    pub fn prepare(&self, slots: &dyn Slots) -> bool {
        if slots.get_guard().0.is_some() {
            return false;
        }
        slots.set_guard(&GUARD_FREE, None)
    }

    /// Creates a slot never written as free, under the guard. `false` when the guard could not
    /// be taken (another worker holds it): nothing was written.
    fn create_slot(&self, slots: &dyn Slots, slot: u32, owner: u64, now_ms: u64) -> bool {
        let mut taken = None;
        for _ in 0..GUARD_ATTEMPTS {
            match slots.get_guard() {
                (Some(v), Some(cas))
                    if guard_free(&v, now_ms)
                        && slots.set_guard(&guard_value(owner.max(1), now_ms), Some(cas)) =>
                {
                    taken = slots.get_guard().1;
                    break;
                }
                // No guard (configure did not run): never write a missing slot unguarded.
                (None, _) | (_, None) => return false,
                _ => {}
            }
        }
        let Some(cas) = taken else {
            return false;
        };
        // Re-checked under the guard: another worker may have created (and locked) it since
        // our lookup.
        if slots.get_meta(slot).0.is_none() {
            slots.set_meta(slot, &Meta::free().encode(), None);
        }
        // Released only if still ours (an expired guard may have been taken over meanwhile).
        slots.set_guard(&GUARD_FREE, Some(cas));
        true
    }

    /// Looks the key up and takes its lock when the request is to be forwarded.
    pub fn begin(
        &self,
        slots: &dyn Slots,
        key: [u8; 32],
        fingerprint: [u8; 32],
        owner: u64,
        now_ms: u64,
        lock_timeout_ms: u64,
    ) -> Begin {
        let lock = lock_record(key, fingerprint, owner, now_ms, lock_timeout_ms);
        let encoded = lock.encode();
        for _ in 0..ATTEMPTS {
            let mut found = None;
            let mut reusable = None;
            let mut missing = None;
            for slot in self.bucket(&key) {
                let (value, cas) = slots.get_meta(slot);
                if value.is_none() {
                    missing = missing.or(Some(slot));
                    continue;
                }
                let meta = value.as_deref().and_then(Meta::decode);
                match meta {
                    Some(m) if m.key == key && m.state != State::Free => {
                        found = Some((slot, m, cas));
                        break;
                    }
                    Some(m) if !m.is_live(now_ms) => {
                        if reusable.is_none() {
                            reusable = Some((slot, cas, m.state == State::Free));
                        }
                    }
                    Some(_) => {}
                    // Unreadable: reusable.
                    None => {
                        if reusable.is_none() {
                            reusable = Some((slot, cas, true));
                        }
                    }
                }
            }
            if let (None, None, Some(slot)) = (&found, &reusable, missing) {
                // No slot to reuse yet: create one and take it while it is free. A record of
                // the key that another worker wrote meanwhile into another new slot is found
                // after locking (below), as for any two racing lookups.
                if !self.create_slot(slots, slot, owner, now_ms) {
                    return Begin::Contended;
                }
                let (value, cas) = slots.get_meta(slot);
                match value.as_deref().and_then(Meta::decode) {
                    Some(m) if m.state == State::Free => reusable = Some((slot, cas, true)),
                    _ => continue,
                }
            }
            if let Some((slot, meta, cas)) = found {
                match decide(Some(&meta), &fingerprint, now_ms) {
                    Decision::Acquire | Decision::TakeOver => {
                        if slots.set_meta(slot, &encoded, cas) {
                            return Begin::Locked {
                                lock: LocalLock {
                                    slot,
                                    meta: lock.clone(),
                                },
                                was_free: false,
                            };
                        }
                        continue;
                    }
                    decision => {
                        return Begin::Found {
                            decision,
                            slot,
                            meta,
                        }
                    }
                }
            }
            let Some((slot, cas, was_free)) = reusable else {
                return Begin::Full;
            };
            if !slots.set_meta(slot, &encoded, cas) {
                continue;
            }
            // Two requests with one key that saw different free slots (another key freed one
            // between their lookups) could each lock a slot. Whoever finds the other's record
            // after locking gives way, so at most one of them is forwarded.
            if let Some(other) = self.other_record(slots, &key, slot, now_ms) {
                self.release(slots, &LocalLock { slot, meta: lock });
                let (slot, meta) = other;
                return match decide(Some(&meta), &fingerprint, now_ms) {
                    Decision::Acquire | Decision::TakeOver => Begin::Contended,
                    decision => Begin::Found {
                        decision,
                        slot,
                        meta,
                    },
                };
            }
            return Begin::Locked {
                lock: LocalLock { slot, meta: lock },
                was_free,
            };
        }
        Begin::Contended
    }

    fn other_record(
        &self,
        slots: &dyn Slots,
        key: &[u8; 32],
        mine: u32,
        now_ms: u64,
    ) -> Option<(u32, Meta)> {
        self.bucket(key).filter(|s| *s != mine).find_map(|slot| {
            let meta = slots.get_meta(slot).0.as_deref().and_then(Meta::decode)?;
            (meta.key == *key && meta.is_live(now_ms)).then_some((slot, meta))
        })
    }

    /// Reads the slot and returns its CAS token if it still holds our lock.
    fn still_ours(&self, slots: &dyn Slots, lock: &LocalLock) -> Option<Option<u32>> {
        let (value, cas) = slots.get_meta(lock.slot);
        let meta = value.as_deref().and_then(Meta::decode)?;
        (meta.state == State::InFlight
            && meta.key == lock.meta.key
            && meta.owner == lock.meta.owner)
            .then_some(cas)
    }

    /// Stores the outcome of a forwarded request: the response when it is given (it fits
    /// `max_response_bytes`), else the key stays completed without a response. `false` when
    /// the lock was lost (taken over after `lock_timeout_s`): nothing is written.
    pub fn complete(
        &self,
        slots: &dyn Slots,
        lock: &LocalLock,
        response: Option<&StoredResponse>,
        now_ms: u64,
        ttl_ms: u64,
    ) -> bool {
        let done = completed_record(&lock.meta, response.is_some(), now_ms, ttl_ms).encode();
        for _ in 0..ATTEMPTS {
            let Some(cas) = self.still_ours(slots, lock) else {
                return false;
            };
            if let Some(r) = response {
                // The response entry first, tagged with key and owner: a reader that sees the
                // completed meta always finds its response.
                slots.set_response(lock.slot, &tagged_response(&lock.meta, r));
            }
            if slots.set_meta(lock.slot, &done, cas) {
                return true;
            }
        }
        false
    }

    /// Frees the slot if it still holds our lock (5xx, reset, timeout): a retry executes
    /// again. `true` when the slot was freed.
    pub fn release(&self, slots: &dyn Slots, lock: &LocalLock) -> bool {
        let free = Meta::free().encode();
        for _ in 0..ATTEMPTS {
            let Some(cas) = self.still_ours(slots, lock) else {
                return false;
            };
            if slots.set_meta(lock.slot, &free, cas) {
                return true;
            }
        }
        false
    }

    /// The stored response of a completed record found by [`LocalStore::begin`].
    pub fn response(&self, slots: &dyn Slots, slot: u32, meta: &Meta) -> Option<StoredResponse> {
        let bytes = slots.get_response(slot)?;
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
pub mod fake {
    //! Shared data over a map, with Envoy's CAS rules (a write with a token succeeds only if
    //! the entry's token is unchanged; a missing entry accepts any token).
    use super::Slots;
    use std::cell::RefCell;
    use std::collections::HashMap;

    #[derive(Default)]
    pub struct FakeSlots {
        pub meta: RefCell<HashMap<u32, (Vec<u8>, u32)>>,
        pub response: RefCell<HashMap<u32, Vec<u8>>>,
        pub guard: RefCell<Option<(Vec<u8>, u32)>>,
        next_cas: RefCell<u32>,
    }

    impl FakeSlots {
        fn next(&self) -> u32 {
            let mut n = self.next_cas.borrow_mut();
            *n += 1;
            *n
        }
    }

    impl Slots for FakeSlots {
        fn get_meta(&self, slot: u32) -> (Option<Vec<u8>>, Option<u32>) {
            match self.meta.borrow().get(&slot) {
                // As the host: an empty value reads as missing.
                Some((v, c)) if v.is_empty() => (None, Some(*c)),
                Some((v, c)) => (Some(v.clone()), Some(*c)),
                None => (None, None),
            }
        }
        fn set_meta(&self, slot: u32, value: &[u8], cas: Option<u32>) -> bool {
            let mut m = self.meta.borrow_mut();
            if let (Some(c), Some((_, cur))) = (cas, m.get(&slot)) {
                if c != 0 && c != *cur {
                    return false;
                }
            }
            m.insert(slot, (value.to_vec(), self.next()));
            true
        }
        fn get_response(&self, slot: u32) -> Option<Vec<u8>> {
            self.response.borrow().get(&slot).cloned()
        }
        fn set_response(&self, slot: u32, value: &[u8]) {
            self.response.borrow_mut().insert(slot, value.to_vec());
        }
        fn get_guard(&self) -> (Option<Vec<u8>>, Option<u32>) {
            match &*self.guard.borrow() {
                Some((v, c)) if v.is_empty() => (None, Some(*c)),
                Some((v, c)) => (Some(v.clone()), Some(*c)),
                None => (None, None),
            }
        }
        fn set_guard(&self, value: &[u8], cas: Option<u32>) -> bool {
            let mut g = self.guard.borrow_mut();
            if let (Some(c), Some((_, cur))) = (cas, g.as_ref()) {
                if c != 0 && c != *cur {
                    return false;
                }
            }
            *g = Some((value.to_vec(), self.next()));
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeSlots;
    use super::*;
    use proptest::prelude::*;

    const FP: [u8; 32] = [1; 32];
    const TIMEOUT: u64 = 30_000;
    const TTL: u64 = 86_400_000;

    fn key(n: u32) -> [u8; 32] {
        let mut k = [0u8; 32];
        k[4..8].copy_from_slice(&n.to_be_bytes());
        k
    }

    fn store(n: u32) -> (LocalStore, FakeSlots) {
        let s = LocalStore { max_entries: n };
        let slots = FakeSlots::default();
        assert!(s.prepare(&slots));
        assert!(!s.prepare(&slots), "preparation is idempotent");
        assert!(slots.meta.borrow().is_empty(), "no slot before first use");
        (s, slots)
    }

    /// A store whose every slot exists already (as after heavy use).
    fn created(n: u32) -> (LocalStore, FakeSlots) {
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
        assert_eq!(slots.meta.borrow().len(), 4, "never more than max_entries");
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
        inner: FakeSlots,
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

    impl Slots for Racing {
        fn get_meta(&self, slot: u32) -> (Option<Vec<u8>>, Option<u32>) {
            self.inner.get_meta(slot)
        }
        fn set_meta(&self, slot: u32, value: &[u8], cas: Option<u32>) -> bool {
            if !self.at_guard {
                self.race();
            }
            self.inner.set_meta(slot, value, cas)
        }
        fn get_response(&self, slot: u32) -> Option<Vec<u8>> {
            self.inner.get_response(slot)
        }
        fn set_response(&self, slot: u32, value: &[u8]) {
            self.inner.set_response(slot, value)
        }
        fn get_guard(&self) -> (Option<Vec<u8>>, Option<u32>) {
            if self.at_guard {
                self.race();
            }
            self.inner.get_guard()
        }
        fn set_guard(&self, value: &[u8], cas: Option<u32>) -> bool {
            self.inner.set_guard(value, cas)
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
        assert_eq!(slots.meta.borrow().len(), 1);
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
        assert_eq!(slots.meta.borrow().len(), 2);
    }

    #[test]
    fn a_guard_held_by_another_worker_writes_nothing_until_it_expires() {
        let (s, slots) = store(64);
        slots.set_guard(&guard_value(42, 1000), None);
        assert_eq!(
            s.begin(&slots, key(12), FP, 1, 1000, TIMEOUT),
            Begin::Contended
        );
        assert!(slots.meta.borrow().is_empty());
        // Its worker died while holding it: taken over after GUARD_TIMEOUT_MS.
        lock_of(s.begin(&slots, key(12), FP, 1, 1000 + GUARD_TIMEOUT_MS, TIMEOUT));
    }

    #[test]
    fn without_a_guard_no_missing_slot_is_written() {
        let s = LocalStore { max_entries: 64 };
        let slots = FakeSlots::default();
        assert_eq!(
            s.begin(&slots, key(13), FP, 1, 1000, TIMEOUT),
            Begin::Contended
        );
        assert!(slots.meta.borrow().is_empty());
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
                prop_assert!(slots.meta.borrow().len() <= 16);
                prop_assert!(slots.response.borrow().len() <= 16);
            }
        }
    }
}
