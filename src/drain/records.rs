//! The drain's records in shared data, as bytes: the state, each worker's in-flight count, the
//! worker registry and the readiness poller's lease.

use super::state::{DrainSource, DrainState, PollLease, ReadinessVerdict};
use crate::shared::{update, SharedData, Step, Update};

/// The shared-data keys. The state is one record for the whole Envoy process (every worker).
pub const STATE_KEY: &str = "handoff.drain.state";
/// The registry of workers publishing an in-flight record ([`with_worker`]).
pub const WORKERS_KEY: &str = "handoff.drain.workers";
/// Prefix of each worker's in-flight record (the worker id follows).
pub const INFLIGHT_PREFIX: &str = "handoff.drain.inflight.";
pub const LEASE_KEY: &str = "handoff.drain.poller";
/// Compare-and-swap attempts before a write gives up (contention between workers).
pub const CAS_ATTEMPTS: usize = 64;

pub const STATE_LEN: usize = 18;
const STATE_VERSION: u8 = 1;

impl DrainState {
    pub fn encode(&self) -> [u8; STATE_LEN] {
        let mut b = [0u8; STATE_LEN];
        b[0] = STATE_VERSION;
        b[1] = self.source.map_or(0, DrainSource::code);
        b[2..6].copy_from_slice(&self.grace_s.to_le_bytes());
        b[6..14].copy_from_slice(&self.since_ms.to_le_bytes());
        b[14..18].copy_from_slice(&self.generation.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<DrainState> {
        if b.len() != STATE_LEN || b[0] != STATE_VERSION {
            return None;
        }
        let source = match b[1] {
            0 => None,
            c => Some(DrainSource::from_code(c)?),
        };
        Some(DrainState {
            source,
            grace_s: u32::from_le_bytes(b[2..6].try_into().ok()?),
            since_ms: u64::from_le_bytes(b[6..14].try_into().ok()?),
            generation: u32::from_le_bytes(b[14..18].try_into().ok()?),
        })
    }
}

/// One worker's share of the in-flight count, in shared data under a key of its own: only that
/// worker writes it, so a request start or end is one unconditional write (no read, no CAS
/// loop). `heartbeat_ms` is refreshed on every tick; a record whose worker stopped ticking
/// (its VM is gone) stops counting after [`WorkerInflight::stale_after_ms`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WorkerInflight {
    pub count: u64,
    pub heartbeat_ms: u64,
}

pub const WORKER_INFLIGHT_LEN: usize = 16;

impl WorkerInflight {
    pub fn encode(&self) -> [u8; WORKER_INFLIGHT_LEN] {
        let mut out = [0u8; WORKER_INFLIGHT_LEN];
        out[..8].copy_from_slice(&self.count.to_be_bytes());
        out[8..].copy_from_slice(&self.heartbeat_ms.to_be_bytes());
        out
    }

    pub fn decode(b: &[u8]) -> Option<WorkerInflight> {
        if b.len() != WORKER_INFLIGHT_LEN {
            return None;
        }
        Some(WorkerInflight {
            count: u64::from_be_bytes(b[..8].try_into().ok()?),
            heartbeat_ms: u64::from_be_bytes(b[8..].try_into().ok()?),
        })
    }

    /// How long a record counts without a heartbeat: three ticks and 10 s of slack (a busy
    /// worker's tick may be late).
    pub fn stale_after_ms(tick_ms: u32) -> u64 {
        3 * u64::from(tick_ms) + 10_000
    }

    pub fn live(&self, now_ms: u64, tick_ms: u32) -> bool {
        now_ms.saturating_sub(self.heartbeat_ms) < Self::stale_after_ms(tick_ms)
    }
}

/// The ids of the workers that publish an in-flight record (shared data, CAS-appended when a
/// worker is configured). At most [`MAX_WORKERS`]: registering drops stale workers first.
pub const MAX_WORKERS: usize = 512;

pub fn decode_workers(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .filter_map(|c| c.try_into().ok().map(u64::from_be_bytes))
        .collect()
}

pub fn encode_workers(ids: &[u64]) -> Vec<u8> {
    ids.iter().flat_map(|id| id.to_be_bytes()).collect()
}

/// The registry with `me` in it, keeping only workers `live` says are still there (and at most
/// [`MAX_WORKERS`], newest last). `None` when `me` is already registered.
pub fn with_worker(ids: &[u64], me: u64, live: &dyn Fn(u64) -> bool) -> Option<Vec<u64>> {
    if ids.contains(&me) {
        return None;
    }
    let mut next: Vec<u64> = ids.iter().copied().filter(|id| live(*id)).collect();
    next.push(me);
    let excess = next.len().saturating_sub(MAX_WORKERS);
    next.drain(..excess);
    Some(next)
}

pub const LEASE_LEN: usize = 20;

impl PollLease {
    pub fn encode(&self) -> [u8; LEASE_LEN] {
        let mut b = [0u8; LEASE_LEN];
        b[0..8].copy_from_slice(&self.owner.to_le_bytes());
        b[8..16].copy_from_slice(&self.expires_ms.to_le_bytes());
        b[16..20].copy_from_slice(&self.failures.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<PollLease> {
        if b.len() != LEASE_LEN {
            return None;
        }
        Some(PollLease {
            owner: u64::from_le_bytes(b[0..8].try_into().ok()?),
            expires_ms: u64::from_le_bytes(b[8..16].try_into().ok()?),
            failures: u32::from_le_bytes(b[16..20].try_into().ok()?),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The records over shared data: every read-modify-write goes through `crate::shared::update`.

/// Creates a record unless a worker (or an earlier configuration) already did.
fn init_key(store: &dyn SharedData, key: &str, value: &[u8]) {
    if store.get(key).0.is_none() {
        let _ = store.set(key, value, None);
    }
}

/// Creates the state and lease records on the first configuration of this Envoy.
pub fn init(store: &dyn SharedData, now_ms: u64) {
    init_key(store, STATE_KEY, &DrainState::serving(now_ms).encode());
    init_key(store, LEASE_KEY, &PollLease::default().encode());
}

/// The state in effect (serving when the record is missing or unreadable).
pub fn read_state(store: &dyn SharedData) -> DrainState {
    store
        .get(STATE_KEY)
        .0
        .and_then(|b| DrainState::decode(&b))
        .unwrap_or(DrainState::serving(0))
}

/// The one instantiation of [`update`] for every drain record (each would otherwise be a copy of
/// the loop in the wasm): `f` returns the bytes to write, or `None` to keep the value, and keeps
/// whatever else it decided in its captures (the last run is the one that counts).
type Decide<'a> = dyn FnMut(Option<&[u8]>) -> Option<Vec<u8>> + 'a;

fn cas(store: &dyn SharedData, key: &str, f: &mut Decide) -> Update<()> {
    update(store, key, CAS_ATTEMPTS, |v| match f(v) {
        Some(bytes) => Step::Write(bytes, ()),
        None => Step::Keep(()),
    })
}

/// Applies `f` to the shared state. `Written`: this call made the transition; `Unchanged`: `f`
/// had nothing to do given the state now in effect; `Failed`: contention or the host refused.
pub fn transition(
    store: &dyn SharedData,
    f: &dyn Fn(&DrainState) -> Option<DrainState>,
) -> Update<DrainState> {
    let mut seen = DrainState::serving(0);
    let out = cas(store, STATE_KEY, &mut |v| {
        let current = v
            .and_then(DrainState::decode)
            .unwrap_or(DrainState::serving(0));
        let next = f(&current);
        seen = next.unwrap_or(current);
        next.map(|n| n.encode().to_vec())
    });
    match out {
        Update::Written(()) => Update::Written(seen),
        Update::Unchanged(()) => Update::Unchanged(seen),
        Update::Failed(e) => Update::Failed(e),
    }
}

pub fn inflight_key(worker: u64) -> String {
    format!("{INFLIGHT_PREFIX}{worker}")
}

fn read_worker(store: &dyn SharedData, worker: u64) -> Option<WorkerInflight> {
    WorkerInflight::decode(&store.get(&inflight_key(worker)).0?)
}

fn read_workers(store: &dyn SharedData) -> Vec<u64> {
    store
        .get(WORKERS_KEY)
        .0
        .map_or_else(Vec::new, |b| decode_workers(&b))
}

/// This worker's in-flight record (one unconditional write: only this worker writes it).
pub fn publish_inflight(store: &dyn SharedData, key: &str, w: WorkerInflight) {
    let _ = store.set(key, &w.encode(), None);
}

/// Requests in flight in this Envoy: the sum of the live workers' records. Each worker writes
/// its record at every request start and end, so the sum is exact for live workers.
pub fn read_inflight(store: &dyn SharedData, now_ms: u64, tick_ms: u32) -> u64 {
    read_workers(store)
        .into_iter()
        .filter_map(|id| read_worker(store, id))
        .filter(|w| w.live(now_ms, tick_ms))
        .map(|w| w.count)
        .sum()
}

/// Adds `me` to the registry (dropping workers whose record went stale). False when every
/// attempt lost its race.
pub fn register_worker(store: &dyn SharedData, me: u64, now_ms: u64, tick_ms: u32) -> bool {
    let live = |id: u64| read_worker(store, id).is_some_and(|w| w.live(now_ms, tick_ms));
    let out = cas(store, WORKERS_KEY, &mut |v| {
        let ids = v.map_or_else(Vec::new, decode_workers);
        with_worker(&ids, me, &live).map(|next| encode_workers(&next))
    });
    !matches!(out, Update::Failed(_))
}

fn read_lease(v: Option<&[u8]>) -> PollLease {
    v.and_then(PollLease::decode).unwrap_or_default()
}

/// Takes or renews the readiness poller lease for `me`; false when another live worker holds
/// it (or the write failed).
pub fn acquire_lease(store: &dyn SharedData, me: u64, now_ms: u64, ttl_ms: u64) -> bool {
    let out = cas(store, LEASE_KEY, &mut |v| {
        read_lease(v)
            .acquire(me, now_ms, ttl_ms)
            .map(|next| next.encode().to_vec())
    });
    matches!(out, Update::Written(()))
}

/// Records one readiness answer in the lease. `Nothing` when another worker took over polling
/// (or the write failed).
pub fn record_readiness(
    store: &dyn SharedData,
    me: u64,
    ready: bool,
    threshold: u32,
) -> ReadinessVerdict {
    let mut verdict = ReadinessVerdict::Nothing;
    let out = cas(store, LEASE_KEY, &mut |v| {
        let lease = read_lease(v);
        if lease.owner != me {
            return None;
        }
        let (next, v) = lease.record(ready, threshold);
        verdict = v;
        Some(next.encode().to_vec())
    });
    match out {
        Update::Written(()) => verdict,
        _ => ReadinessVerdict::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn worker_inflight_round_trips_and_goes_stale_without_ticks() {
        let w = WorkerInflight {
            count: 3,
            heartbeat_ms: 10_000,
        };
        assert_eq!(WorkerInflight::decode(&w.encode()), Some(w));
        assert_eq!(WorkerInflight::decode(&[1, 2, 3]), None);
        assert!(w.live(10_000 + 12_999, 1000));
        assert!(!w.live(10_000 + 13_000, 1000));
        // Slow ticks (readiness every 60 s) stay live across a late tick.
        assert!(w.live(10_000 + 180_000, 60_000));
    }

    #[test]
    fn registering_a_worker_drops_gone_ones_and_stays_bounded() {
        assert_eq!(decode_workers(&encode_workers(&[1, 2, 3])), vec![1, 2, 3]);
        assert_eq!(with_worker(&[1, 2], 2, &|_| true), None);
        assert_eq!(with_worker(&[1, 2], 3, &|id| id != 1), Some(vec![2, 3]));
        let many: Vec<u64> = (1..=MAX_WORKERS as u64).collect();
        let next = with_worker(&many, 9999, &|_| true).unwrap();
        assert_eq!(next.len(), MAX_WORKERS);
        assert_eq!((next[0], *next.last().unwrap()), (2, 9999));
    }

    proptest! {

        #[test]
        fn state_encoding_round_trips(
            src in prop::option::of(0usize..3), since in any::<u64>(),
            grace in any::<u32>(), generation in any::<u32>(),
        ) {
            let s = DrainState {
                source: src.map(|i| DrainSource::ALL[i]),
                since_ms: since,
                grace_s: grace,
                generation,
            };
            prop_assert_eq!(DrainState::decode(&s.encode()), Some(s));
        }

    }

    use crate::shared::{Memory, WriteError};

    #[test]
    fn transitions_go_through_compare_and_swap() {
        let m = Memory::new();
        init(&m, 5);
        assert_eq!(read_state(&m), DrainState::serving(5));
        m.lose_next_races(3);
        let out = transition(&m, &|s| s.start(DrainSource::Admin, 10, 3));
        let Update::Written(d) = out else {
            panic!("{out:?}")
        };
        assert_eq!((d.since_ms, d.generation), (10, 1));
        assert_eq!(read_state(&m), d);
        // A second start finds the drain running: nothing written.
        let writes = m.writes();
        assert_eq!(
            transition(&m, &|s| s.start(DrainSource::Readiness, 11, 3)),
            Update::Unchanged(d)
        );
        assert_eq!(m.writes(), writes);
        m.lose_next_races(CAS_ATTEMPTS);
        assert_eq!(
            transition(&m, &|s| s.cancel(super::super::CancelBy::Admin, 12)),
            Update::Failed(WriteError::CasMismatch)
        );
        assert_eq!(read_state(&m), d, "a lost race writes nothing");
        // init never overwrites a running drain.
        init(&m, 99);
        assert_eq!(read_state(&m), d);
    }

    #[test]
    fn inflight_is_the_sum_of_live_registered_workers() {
        let m = Memory::new();
        for (id, count, beat) in [(1u64, 2u64, 1000u64), (2, 3, 1000), (3, 7, 0)] {
            publish_inflight(
                &m,
                &inflight_key(id),
                WorkerInflight {
                    count,
                    heartbeat_ms: beat,
                },
            );
            assert!(register_worker(&m, id, 1000, 100));
        }
        assert_eq!(read_inflight(&m, 1000, 100), 12);
        // Worker 3's heartbeat is stale 10.3 s later; a new worker drops it from the registry.
        assert_eq!(read_inflight(&m, 10_301, 100), 5);
        m.lose_next_races(2);
        assert!(register_worker(&m, 4, 10_301, 100));
        assert_eq!(
            decode_workers(&m.value(WORKERS_KEY).unwrap()),
            vec![1, 2, 4]
        );
        m.lose_next_races(CAS_ATTEMPTS);
        assert!(!register_worker(&m, 5, 10_301, 100));
    }

    #[test]
    fn the_lease_has_one_owner_and_records_its_answers() {
        let m = Memory::new();
        init(&m, 0);
        assert!(acquire_lease(&m, 7, 1000, 300));
        assert!(!acquire_lease(&m, 8, 1100, 300));
        assert_eq!(record_readiness(&m, 8, false, 1), ReadinessVerdict::Nothing);
        assert_eq!(record_readiness(&m, 7, false, 2), ReadinessVerdict::Nothing);
        m.lose_next_races(1);
        assert_eq!(record_readiness(&m, 7, false, 2), ReadinessVerdict::Start);
        assert_eq!(
            record_readiness(&m, 7, true, 2),
            ReadinessVerdict::Recovered
        );
        assert!(
            acquire_lease(&m, 8, 1300, 300),
            "expired: another worker takes over"
        );
        m.refuse_next_writes(1);
        assert_eq!(record_readiness(&m, 8, false, 1), ReadinessVerdict::Nothing);
    }
}
