//! The etcd store's protocol as pure steps: each step is an etcd request to send
//! ([`Next::Send`]) or the decision it led to, and the answer to a request is fed back to the
//! flow that sent it. The filter only dispatches the requests and applies the decisions.
//!
//! - lock: a lease (one per worker, reused, see [`LeaseCache`]), then one transaction: if the
//!   key does not exist, put the in-flight record with the lease; else read it, in the same
//!   transaction, so the existing record decides the request.
//! - take over a vanished or abandoned lock: put if the key's `mod_revision` is still the one
//!   read (only one taker wins); retried [`ATTEMPTS`] times in all before answering 409.
//! - complete: put the completed record (same lease) if `mod_revision` is still our lock's.
//! - release: delete the key if `mod_revision` is still our lock's.
//!
//! Every write compares a revision, so a request only ever changes its own lock.

use super::machine::{completed_record, decide, lock_record, verdict, Decision, Verdict};
use super::record::{decode_full, encode_full, Meta, State, StoredResponse};
use super::{OnError, Outcome};
use crate::etcd::{self, Answer, Compare, Op, Request, Txn};

/// Lock transactions (the first and the takeovers after a lost race) before answering 409.
pub const ATTEMPTS: u8 = 3;

/// How long a worker reuses one etcd lease for the records it writes. Leases are not granted
/// per request (etcd keeps every lease in memory until it expires): a worker holds at most
/// `ttl_s / LEASE_REUSE_S + 1` leases, and a record lives between `ttl_s` and
/// `ttl_s + LEASE_REUSE_S` seconds.
pub const LEASE_REUSE_S: u64 = 60;

/// The etcd key of a namespaced key: the configured prefix and the hex hash.
pub fn etcd_key(prefix: &str, key: &[u8; 32]) -> String {
    let mut s = String::with_capacity(prefix.len() + 64);
    s.push_str(prefix);
    s.push_str(&hex::encode(key));
    s
}

/// A worker's current lease, and the reuse policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LeaseCache {
    /// (id, granted at ms)
    current: Option<(i64, u64)>,
}

impl LeaseCache {
    pub const EMPTY: LeaseCache = LeaseCache { current: None };

    /// The lease if it is still fresh enough to carry a new record for `ttl_s`.
    pub fn fresh(&self, now_ms: u64) -> Option<i64> {
        self.current
            .filter(|(_, at)| now_ms.saturating_sub(*at) < LEASE_REUSE_S * 1000)
            .map(|(id, _)| id)
    }

    pub fn granted(&mut self, id: i64, now_ms: u64) {
        self.current = Some((id, now_ms));
    }

    /// After an etcd failure: the lease may be the problem (etcd lost it), grant a new one.
    pub fn forget(&mut self) {
        self.current = None;
    }
}

/// What the flow needs from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Settings<'a> {
    pub prefix: &'a str,
    pub ttl_s: u64,
    pub lock_timeout_ms: u64,
    pub on_error: OnError,
}

/// The lock a forwarded request holds in etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdLock {
    pub key: String,
    /// The `mod_revision` our lock record was written at: completion and release compare it.
    pub revision: i64,
    pub lease: i64,
    /// The in-flight record as written.
    pub meta: Meta,
}

/// What the filter does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Send this request and feed its answer to [`LockFlow::on_answer`].
    Send(Request),
    /// The lock is ours: forward (outcome `first`).
    Locked(EtcdLock),
    /// Not forwarded: answer with this.
    Reply(Verdict),
    /// etcd failed and `on_error` is `allow`: forward without protection (outcome
    /// `store_error`).
    Unprotected,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Stage {
    /// A lease grant is out; the lock attempt that follows it.
    Lease {
        attempt: u8,
    },
    /// A lock transaction is out: the record it writes, the lease, the attempt (0-based).
    Lock {
        meta: Meta,
        lease: i64,
        attempt: u8,
    },
    Done,
}

/// One request's way to the lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockFlow {
    key: String,
    store_key: [u8; 32],
    fingerprint: [u8; 32],
    owner: u64,
    stage: Stage,
    /// Why the flow ended in a store error (for the log).
    pub failure: Option<etcd::Error>,
    /// A lock transaction whose answer failed may still have been applied (etcd took it,
    /// then the answer timed out or was lost): the release of exactly what it wrote, with the
    /// lock record, for the filter to queue. Without it the key stays locked until
    /// `lock_timeout_s`, and every retry in between gets 409.
    /// Boxed: a flow lives in every paused request's state, the undo only in failed ones.
    undo: Option<Box<(Request, Meta)>>,
}

impl LockFlow {
    /// The first step: a lease grant, or the lock transaction with a fresh cached lease.
    pub fn start(
        s: &Settings,
        store_key: [u8; 32],
        fingerprint: [u8; 32],
        owner: u64,
        now_ms: u64,
        leases: &LeaseCache,
    ) -> (LockFlow, Next) {
        let mut flow = LockFlow {
            key: etcd_key(s.prefix, &store_key),
            store_key,
            fingerprint,
            owner,
            stage: Stage::Lease { attempt: 0 },
            failure: None,
            undo: None,
        };
        let next = match leases.fresh(now_ms) {
            Some(lease) => flow.lock(s, lease, 0, None, now_ms),
            None => Next::Send(etcd::lease_grant(s.ttl_s + LEASE_REUSE_S)),
        };
        (flow, next)
    }

    /// The answer to the request the last step sent.
    pub fn on_answer(
        &mut self,
        s: &Settings,
        answer: &Answer,
        now_ms: u64,
        leases: &mut LeaseCache,
    ) -> Next {
        match std::mem::replace(&mut self.stage, Stage::Done) {
            Stage::Lease { attempt } => match etcd::parse_lease_grant(answer) {
                Ok(lease) => {
                    leases.granted(lease.id, now_ms);
                    self.lock(s, lease.id, attempt, None, now_ms)
                }
                Err(e) => self.failed(s, e, leases),
            },
            Stage::Lock {
                meta,
                lease,
                attempt,
            } => match etcd::parse_txn(answer) {
                Ok(Txn::Succeeded { revision }) => Next::Locked(EtcdLock {
                    key: self.key.clone(),
                    revision,
                    lease,
                    meta,
                }),
                Ok(Txn::Failed { kv }) => self.existing(s, kv, lease, attempt, now_ms),
                // The cached lease expired or etcd lost it: a new one, then the lock again.
                Err(etcd::Error::LeaseNotFound) if attempt + 1 < ATTEMPTS => {
                    leases.forget();
                    self.stage = Stage::Lease {
                        attempt: attempt + 1,
                    };
                    Next::Send(etcd::lease_grant(s.ttl_s + LEASE_REUSE_S))
                }
                Err(e) => {
                    self.undo = Some(Box::new((self.release_of(&meta), meta)));
                    self.failed(s, e, leases)
                }
            },
            // An answer nobody waits for (a duplicate callback): nothing changes.
            Stage::Done => Next::Reply(Verdict::Problem(Outcome::StoreError)),
        }
    }

    /// The lock transaction: create the key (`over = None`) or take over the record at
    /// revision `over`.
    fn lock(&mut self, s: &Settings, lease: i64, attempt: u8, over: Option<i64>, now: u64) -> Next {
        let meta = lock_record(
            self.store_key,
            self.fingerprint,
            self.owner,
            now,
            s.lock_timeout_ms,
        );
        let value = encode_full(&meta, None);
        let key = self.key.as_str();
        let compare = match over {
            None => Compare::Absent(key),
            Some(rev) => Compare::ModRevision(key, rev),
        };
        let put = Op::Put {
            key,
            value: &value,
            lease: Some(lease),
        };
        let request = etcd::txn(&[compare], &[put], &[Op::Range(key)]);
        self.stage = Stage::Lock {
            meta,
            lease,
            attempt,
        };
        Next::Send(request)
    }

    /// The key exists (or vanished between compare and read): its record decides.
    fn existing(
        &mut self,
        s: &Settings,
        kv: Option<etcd::Kv>,
        lease: i64,
        attempt: u8,
        now: u64,
    ) -> Next {
        let record = kv
            .as_ref()
            .and_then(|kv| decode_full(&kv.value).map(|r| (r, kv.mod_revision)));
        let decision = match &record {
            Some(((meta, _), _)) => decide(Some(meta), &self.fingerprint, now),
            // Gone (lease expired) or unreadable: free to take.
            None => Decision::Acquire,
        };
        match decision {
            Decision::Acquire | Decision::TakeOver => {
                if attempt + 1 >= ATTEMPTS {
                    return Next::Reply(verdict(Decision::InFlight, None));
                }
                // Against the revision read, so that only one taker wins.
                let over = kv.map(|kv| kv.mod_revision);
                self.lock(s, lease, attempt + 1, over, now)
            }
            decision => Next::Reply(verdict(decision, record.and_then(|((_, r), _)| r))),
        }
    }

    fn failed(&mut self, s: &Settings, e: etcd::Error, leases: &mut LeaseCache) -> Next {
        leases.forget();
        self.failure = Some(e);
        match s.on_error {
            OnError::Allow => Next::Unprotected,
            OnError::Reject => Next::Reply(Verdict::Problem(Outcome::StoreError)),
        }
    }

    /// The request went away while its lock transaction was out (the client left): the
    /// release of whatever that transaction wrote, to send without waiting for its answer.
    /// It deletes the key only if it still holds the exact record this flow wrote, so it is
    /// harmless when the transaction failed or someone else holds the key. `None` when no
    /// lock transaction was out. The lock record, for the release's deadline, comes with it.
    pub fn abandon(&self) -> Option<(Request, Meta)> {
        let Stage::Lock { meta, .. } = &self.stage else {
            return None;
        };
        Some((self.release_of(meta), meta.clone()))
    }

    /// The release of the lock record `meta` if the key still holds exactly it.
    fn release_of(&self, meta: &Meta) -> Request {
        let key = self.key.as_str();
        let value = encode_full(meta, None);
        etcd::txn(&[Compare::Value(key, &value)], &[Op::Delete(key)], &[])
    }

    /// After a failed lock transaction: the release of what it may have written (see
    /// [`LockFlow::abandon`]), to send without waiting for the request. Once.
    pub fn take_undo(&mut self) -> Option<(Request, Meta)> {
        self.undo.take().map(|u| *u)
    }

    /// The flow ends here because the request could not be sent (the cluster is unknown):
    /// the same decision as an etcd failure.
    pub fn unsent(&mut self, s: &Settings, leases: &mut LeaseCache) -> Next {
        self.stage = Stage::Done;
        self.failed(s, etcd::Error::Unreachable, leases)
    }
}

/// The two writes that end a lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// The completed record replaces the lock.
    Complete,
    /// The lock is deleted (5xx, reset, timeout): a retry executes again.
    Release,
}

impl Write {
    pub fn as_str(self) -> &'static str {
        match self {
            Write::Complete => "completion",
            Write::Release => "release",
        }
    }
}

/// The completion of `lock`: the response when it is given (it fit `max_response_bytes`),
/// else the key stays completed without a response (`idempotency-not-replayable`).
pub fn complete(
    lock: &EtcdLock,
    response: Option<&StoredResponse>,
    now_ms: u64,
    ttl_ms: u64,
) -> Request {
    let done = completed_record(&lock.meta, response.is_some(), now_ms, ttl_ms);
    let value = encode_full(&done, response);
    let key = lock.key.as_str();
    etcd::txn(
        &[Compare::ModRevision(key, lock.revision)],
        &[Op::Put {
            key,
            value: &value,
            lease: Some(lock.lease),
        }],
        &[Op::Range(key)],
    )
}

/// The release of `lock`.
pub fn release(lock: &EtcdLock) -> Request {
    let key = lock.key.as_str();
    etcd::txn(
        &[Compare::ModRevision(key, lock.revision)],
        &[Op::Delete(key)],
        &[],
    )
}

/// How a completion or release ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// Written (or found already written by an earlier attempt whose answer was lost).
    Done,
    /// The record is no longer our lock (taken over, or gone with its lease): the completion
    /// cannot be stored.
    Lost,
    /// etcd did not answer or failed in a way that may pass: try again.
    Retry(etcd::Error),
    /// etcd refused for good (the lease is gone, a malformed answer).
    Failed(etcd::Error),
}

/// Reads the answer to a [`complete`] or [`release`] of the lock owned by `owner`.
pub fn settle(write: Write, owner: u64, answer: &Answer) -> Settled {
    match (write, etcd::parse_txn(answer)) {
        (_, Ok(Txn::Succeeded { .. })) => Settled::Done,
        // Nothing of ours left to delete.
        (Write::Release, Ok(Txn::Failed { .. })) => Settled::Done,
        (Write::Complete, Ok(Txn::Failed { kv })) => {
            // An attempt whose answer timed out may have been applied: then the record is
            // our completion.
            let ours = kv.and_then(|kv| Meta::decode(&kv.value)).is_some_and(|m| {
                m.owner == owner && matches!(m.state, State::Completed | State::Unreplayable)
            });
            if ours {
                Settled::Done
            } else {
                Settled::Lost
            }
        }
        (_, Err(e)) if e.is_transient() => Settled::Retry(e),
        (_, Err(e)) => Settled::Failed(e),
    }
}

#[cfg(test)]
mod tests;
