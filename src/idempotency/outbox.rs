//! Completions and releases that etcd did not take, kept and retried until they are stored or
//! their deadline passes.
//!
//! When etcd fails between forwarding a request and storing its response, the client still
//! gets its answer, but the key's record stays an in-flight lock. Left alone, the next retry
//! after `lock_timeout_s` takes the lock over and the app executes the operation again. So the
//! completion (or the release after a 5xx or a reset) is kept here and sent again, with
//! backoff, as the same compare-and-swap on the lock's revision.
//!
//! The deadline is well inside the lock: a pending completion is never raced by a takeover,
//! which only happens once the lock expires. The margin, [`margin_ms`], covers one etcd
//! timeout (the last attempt must land before the lock expires) and a quarter of
//! `lock_timeout_s` (for clock skew between Envoys, which judge expiry by their own clocks).
//!
//! The queue is bounded by [`Limits`]; what does not fit is dropped, and the caller counts and
//! logs each drop.

use super::etcd::{settle, Settled, Write};
use super::record::Meta;
use crate::etcd::{Answer, Request};

/// First retry delay; doubled per failed attempt up to [`MAX_BACKOFF_MS`].
pub const FIRST_BACKOFF_MS: u64 = 100;
pub const MAX_BACKOFF_MS: u64 = 1000;
/// Entries sent per tick: etcd coming back is not met with the whole queue at once.
pub const PER_TICK: usize = 16;

/// How long before a lock's expiry its pending writes are given up.
pub fn margin_ms(lock_timeout_ms: u64, etcd_timeout_ms: u64) -> u64 {
    etcd_timeout_ms + lock_timeout_ms / 4
}

/// The last moment a pending write for the lock `meta` may be sent.
pub fn deadline_ms(meta: &Meta, etcd_timeout_ms: u64) -> u64 {
    let lock_timeout = meta.expires_at_ms.saturating_sub(meta.locked_at_ms);
    meta.expires_at_ms
        .saturating_sub(margin_ms(lock_timeout, etcd_timeout_ms))
}

/// The queue's bounds, per worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_entries: usize,
    /// Sum of the entries' request bodies.
    pub max_bytes: usize,
}

impl Limits {
    /// As the store's own bounds allow: at most [`PENDING_ENTRIES`] writes, and room for
    /// [`PENDING_FULL_SIZE`] full-size records (base64 makes a record 4/3 larger).
    pub fn for_store(max_response_bytes: usize) -> Limits {
        let record = (max_response_bytes + super::record::META_LEN) * 4 / 3 + 512;
        Limits {
            max_entries: PENDING_ENTRIES,
            max_bytes: record * PENDING_FULL_SIZE,
        }
    }
}

pub const PENDING_ENTRIES: usize = 1000;
pub const PENDING_FULL_SIZE: usize = 64;

/// One write waiting to be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub write: Write,
    /// The lock's owner (to recognise our own completion already applied).
    pub owner: u64,
    pub request: Request,
    pub deadline_ms: u64,
    /// Attempts made so far (the first, by the request itself, included).
    pub tries: u32,
    next_at_ms: u64,
    /// The callout carrying it and when it left.
    sent: Option<(u32, u64)>,
    /// A retry from the queue failed already.
    failed: bool,
}

impl Entry {
    /// A write whose first attempt failed at `now_ms`.
    pub fn failed_once(
        write: Write,
        owner: u64,
        request: Request,
        deadline_ms: u64,
        now_ms: u64,
    ) -> Entry {
        Entry {
            write,
            owner,
            request,
            deadline_ms,
            tries: 1,
            next_at_ms: now_ms + FIRST_BACKOFF_MS,
            sent: None,
            failed: false,
        }
    }

    /// A write not tried yet (its request could not wait for an answer): sent at the next
    /// tick.
    pub fn unsent(
        write: Write,
        owner: u64,
        request: Request,
        deadline_ms: u64,
        now_ms: u64,
    ) -> Entry {
        Entry {
            tries: 0,
            next_at_ms: now_ms,
            ..Entry::failed_once(write, owner, request, deadline_ms, now_ms)
        }
    }

    fn bytes(&self) -> usize {
        self.request.body.len()
    }
}

/// What an answer did to the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answered {
    /// etcd failed in a way that may pass: kept for another attempt; `first` on the entry's
    /// first failed retry (for one log line per entry).
    Retrying {
        error: crate::etcd::Error,
        first: bool,
        /// The entry had not failed before it was queued (it was queued to be confirmed).
        unsent: bool,
    },
    Gone(Gone),
}

/// How an entry left the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gone {
    /// etcd answered: stored, lost to a takeover, or refused for good.
    Settled(Entry, Settled),
    /// Its deadline passed before etcd took it.
    Expired(Entry),
}

#[derive(Debug)]
pub struct Outbox {
    entries: Vec<Entry>,
    bytes: usize,
    limits: Limits,
    /// The store settings the entries were written for (cluster, authority, prefix).
    store: String,
}

impl Outbox {
    /// Holds nothing until configured.
    pub const EMPTY: Outbox = Outbox {
        entries: Vec::new(),
        bytes: 0,
        limits: Limits {
            max_entries: 0,
            max_bytes: 0,
        },
        store: String::new(),
    };

    pub fn new(limits: Limits, store: String) -> Outbox {
        Outbox {
            entries: Vec::new(),
            bytes: 0,
            limits,
            store,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether callout `token` carries one of the entries.
    pub fn carries(&self, token: u32) -> bool {
        self.entries
            .iter()
            .any(|e| matches!(e.sent, Some((t, _)) if t == token))
    }

    /// A new configuration: the entries survive when they were written for the same store;
    /// otherwise they are returned (dropped: the store they belong to is no longer
    /// configured).
    pub fn configure(&mut self, limits: Limits, store: &str) -> Vec<Entry> {
        self.limits = limits;
        if self.store == store {
            return Vec::new();
        }
        self.store = store.to_string();
        self.bytes = 0;
        self.entries.drain(..).collect()
    }

    /// Queues `e`; gives it back when the queue is full.
    pub fn push(&mut self, e: Entry) -> Result<(), Entry> {
        if self.entries.len() >= self.limits.max_entries
            || self.bytes + e.bytes() > self.limits.max_bytes
        {
            return Err(e);
        }
        self.bytes += e.bytes();
        self.entries.push(e);
        Ok(())
    }

    /// The entries to send now, oldest first, at most [`PER_TICK`]: (index to pass to
    /// [`Outbox::sent`], request). Entries whose deadline passed leave the queue first (in
    /// [`Outbox::expire`]).
    pub fn due(&self, now_ms: u64) -> Vec<(usize, Request)> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.sent.is_none() && e.next_at_ms <= now_ms && now_ms <= e.deadline_ms)
            .take(PER_TICK)
            .map(|(i, e)| (i, e.request.clone()))
            .collect()
    }

    /// The entry at `index` (from [`Outbox::due`]) left in the callout `token`; `None`: it
    /// could not be dispatched, and counts as a failed attempt.
    pub fn sent(&mut self, index: usize, token: Option<u32>, now_ms: u64) {
        if let Some(e) = self.entries.get_mut(index) {
            match token {
                Some(t) => e.sent = Some((t, now_ms)),
                None => backoff(e, now_ms),
            }
        }
    }

    /// The answer to callout `token`, if it carried one of ours: a transient failure keeps
    /// the entry for another attempt, anything else ends it.
    pub fn answered(&mut self, token: u32, answer: &Answer, now_ms: u64) -> Option<Answered> {
        let i = self
            .entries
            .iter()
            .position(|e| matches!(e.sent, Some((t, _)) if t == token))?;
        let e = &mut self.entries[i];
        match settle(e.write, e.owner, answer) {
            Settled::Retry(error) => {
                let first = !e.failed;
                let unsent = e.tries == 0;
                e.failed = true;
                backoff(e, now_ms);
                Some(Answered::Retrying {
                    error,
                    first,
                    unsent,
                })
            }
            settled => {
                let e = self.remove(i);
                Some(Answered::Gone(Gone::Settled(e, settled)))
            }
        }
    }

    /// Removes the entries that can no longer be sent in time, and re-arms those whose
    /// answer is overdue by `answer_timeout_ms` (lost with the context that sent it).
    pub fn expire(&mut self, now_ms: u64, answer_timeout_ms: u64) -> Vec<Entry> {
        for e in self.entries.iter_mut() {
            if matches!(e.sent, Some((_, at)) if now_ms > at + answer_timeout_ms) {
                backoff(e, now_ms);
            }
        }
        let mut gone = Vec::new();
        let mut i = 0;
        while i < self.entries.len() {
            let e = &self.entries[i];
            if e.sent.is_none() && now_ms > e.deadline_ms {
                gone.push(self.remove(i));
            } else {
                i += 1;
            }
        }
        gone
    }

    fn remove(&mut self, i: usize) -> Entry {
        let e = self.entries.remove(i);
        self.bytes -= e.bytes();
        e
    }
}

fn backoff(e: &mut Entry, now_ms: u64) {
    e.sent = None;
    let delay = FIRST_BACKOFF_MS
        .saturating_mul(1 << e.tries.min(10))
        .min(MAX_BACKOFF_MS);
    e.tries += 1;
    // One last attempt at the deadline rather than none.
    e.next_at_ms = (now_ms + delay).min(e.deadline_ms.max(now_ms));
}

#[cfg(test)]
mod tests;
