//! One Envoy's side of the rollout control, as a pure state machine in the style of the
//! idempotency lock flow: [`Flow::next`] says which etcd request to send (one at a time),
//! [`Flow::answer`] takes its answer and says what happened ([`Event`]s); the filter only
//! dispatches and applies. Nothing here waits: a request that gets no answer is an error like
//! any other, and the Envoy keeps the last record it read.
//!
//! What the flow does, in this order of priority:
//! 1. a local guard abort not yet in the record: write the record aborted (`envoy:ID`), a
//!    compare-and-swap on the revision last read; a lost race reads the new record, and the
//!    abort is written on it unless it was changed later than the abort;
//! 2. a fleet window judged and not yet written (see 6): write it, the same way;
//! 3. every `poll_ms`: read the record. An Envoy that holds a lease and is not the leader
//!    reads it in a read-only transaction that also says whether the leader key is absent
//!    (no raft proposal, unlike a transaction holding a put); only when it is does the Envoy
//!    send, right away, the transaction that takes the key and reads the record again;
//! 4. with a guard: a lease (`lease_ttl_s`, granted before the first poll), renewed every third
//!    of its TTL;
//! 5. once per window: this Envoy's summed counts of the last finished window, put under its
//!    counts key with its lease (a dead Envoy's expire with it);
//! 6. the leader, once per window: one range read of every Envoy's counts, summed and judged
//!    with the guard's rules; the row of bad windows lives in the record, so a new leader
//!    continues it.
//!
//! After an error the flow sends nothing for `poll_ms`: an unreachable etcd gets one request
//! per Envoy per `poll_ms`.

use super::record::{self, FleetWindow, Read, Record, State, Written};
use super::Control;
use crate::etcd::{self, Answer, Compare, Error, Op, Request};
use crate::guard::{self, Aborted, Figures, Guard, Trigger, Window};

/// What the flow needs from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub prefix: String,
    pub salt: String,
    pub poll_ms: u64,
    pub timeout_ms: u64,
    pub lease_ttl_s: u64,
    /// The guard's rules: the fleet judgment (and the lease, counts and leader key it needs)
    /// runs only with a guard.
    pub guard: Option<Guard>,
}

/// What a request is for; each names a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Poll,
    WriteAbort,
    Grant,
    Keepalive,
    Publish,
    Gather,
    Judge,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Poll => "poll",
            Step::WriteAbort => "abort",
            Step::Grant => "grant",
            Step::Keepalive => "keepalive",
            Step::Publish => "publish",
            Step::Gather => "gather",
            Step::Judge => "judge",
        }
    }

    /// `read`, `write` or `lease`.
    pub fn kind(self) -> &'static str {
        match self {
            Step::Poll | Step::Gather => "read",
            Step::WriteAbort | Step::Publish | Step::Judge => "write",
            Step::Grant | Step::Keepalive => "lease",
        }
    }
}

/// What this Envoy knows locally, as of now.
#[derive(Debug, Clone, Copy, Default)]
pub struct Local<'a> {
    /// The local guard's abort: when, and the guard's description of it.
    pub abort: Option<(u64, &'a str)>,
    /// This Envoy's counts (its workers' slots summed) of its last finished window.
    pub counts: Option<(u64, &'a Window)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The record in force changed: apply [`Flow::control`].
    Changed,
    /// The record was changed after the local guard's abort (a resume): resume the local
    /// guard, so cohorts come back exactly as before.
    ResumeLocal,
    /// This Envoy wrote the canary aborted: its local guard's abort, or (`fleet`) the fleet
    /// judgment's. The reason as written.
    Wrote { fleet: bool, reason: String },
    /// A fleet window was judged and written.
    Judged(FleetWindow),
    /// This Envoy took (true) or lost (false) the leader key.
    Leader(bool),
    /// A request failed; nothing more is sent for `poll_ms`.
    Failed(Step, Error),
    /// The record's value is not a record; the one read before stays in force.
    Garbage(String),
}

/// A judged window waiting to be written (again, after a lost race).
#[derive(Debug, Clone)]
struct Pending {
    window: u64,
    sum: Window,
    envoys: u32,
    attempts: u8,
}

/// Write attempts of one fleet window before it is left to the next.
const JUDGE_ATTEMPTS: u8 = 3;

/// How a poll reads the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Poll {
    /// The record alone (no lease, or this Envoy is the leader, or no fleet judgment).
    Plain,
    /// The record, and whether the leader key is absent: a transaction of reads only, which
    /// etcd answers without a raft proposal (a transaction holding a put goes through
    /// consensus even when its compare fails, so polling with the put would cost the cluster
    /// a proposal per Envoy per poll).
    Probe,
    /// The leader key was absent at the last probe: take it if it still is, and read the
    /// record in the same transaction.
    Acquire,
}

#[derive(Debug, Clone)]
enum Inflight {
    Poll(Poll),
    WriteAbort { at_ms: u64, record: Record },
    Grant,
    Keepalive,
    Publish(u64),
    Gather(u64),
    Judge { record: Record, fleet: FleetWindow },
}

impl Inflight {
    fn step(&self) -> Step {
        match self {
            Inflight::Poll(_) => Step::Poll,
            Inflight::WriteAbort { .. } => Step::WriteAbort,
            Inflight::Grant => Step::Grant,
            Inflight::Keepalive => Step::Keepalive,
            Inflight::Publish(_) => Step::Publish,
            Inflight::Gather(_) => Step::Gather,
            Inflight::Judge { .. } => Step::Judge,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Flow {
    /// This Envoy's id (16 hex digits), in its counts key, the leader key and `by`.
    pub id: String,
    s: Settings,
    inflight: Option<Inflight>,
    /// The record in force (absent: active at the configured percent).
    in_force: Record,
    /// Its `mod_revision` as last read (`None`: absent), known once `read_once`.
    revision: Option<i64>,
    read_once: bool,
    /// The value last read is not a record.
    garbage: bool,
    next_poll_ms: u64,
    /// After an error: nothing is sent before this.
    quiet_until_ms: u64,
    lease: Option<i64>,
    renewed_ms: u64,
    leader: bool,
    /// The last probe found no leader: the next poll tries to take the key.
    leader_absent: bool,
    /// The last window whose counts this Envoy put.
    published: u64,
    /// The last fleet window this Envoy judged (or found judged).
    judged: u64,
    judge: Option<Pending>,
    /// The local abort (its time) this Envoy wrote.
    wrote_abort: Option<u64>,
}

impl Flow {
    pub fn new(id: String, s: Settings) -> Flow {
        Flow {
            id,
            s,
            inflight: None,
            in_force: Record::absent(),
            revision: None,
            read_once: false,
            garbage: false,
            next_poll_ms: 0,
            quiet_until_ms: 0,
            lease: None,
            renewed_ms: 0,
            leader: false,
            leader_absent: false,
            published: 0,
            judged: 0,
            judge: None,
            wrote_abort: None,
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.s
    }

    /// The record in force.
    pub fn record(&self) -> &Record {
        &self.in_force
    }

    /// What every worker applies.
    pub fn control(&self) -> Control {
        Control {
            aborted: self.in_force.state == State::Aborted,
            threshold: self.in_force.percent,
        }
    }

    pub fn leader(&self) -> bool {
        self.leader
    }

    /// This Envoy's etcd lease, once granted.
    pub fn lease(&self) -> Option<i64> {
        self.lease
    }

    pub fn busy(&self) -> bool {
        self.inflight.is_some()
    }

    /// The window whose counts the flow would publish now, if it wants any: the glue sums its
    /// workers' slots only then.
    pub fn counts_wanted(&self, now_ms: u64) -> Option<u64> {
        let g = self.s.guard.as_ref()?;
        let w = g.window_of(now_ms).checked_sub(1)?;
        (w > self.published && self.lease.is_some() && self.active()).then_some(w)
    }

    fn active(&self) -> bool {
        self.in_force.state == State::Active
    }

    /// How long after a window's end the leader judges it: every Envoy has published its
    /// counts by then (its workers rolled or the guard's grace passed, then a tick and a round
    /// trip), and the next window's counts have not replaced them yet.
    pub fn judge_delay_ms(&self, g: &Guard) -> u64 {
        let publish = g.judge_grace_ms() + 2 * u64::from(g.tick_ms()) + self.s.timeout_ms + 1000;
        publish.min(g.window_ms() / 2)
    }

    /// The next request to send, if any is due (none while one is out).
    pub fn next(&mut self, now_ms: u64, local: &Local) -> Option<(Step, Request)> {
        if self.inflight.is_some() || now_ms < self.quiet_until_ms {
            return None;
        }
        let ttl_ms = self.s.lease_ttl_s * 1000;
        if self.lease.is_some() && now_ms >= self.renewed_ms + ttl_ms {
            // Unrenewed for a whole TTL: etcd has let it go, and the leader key with it.
            self.lease = None;
            self.leader = false;
        }
        let (prefix, salt) = (self.s.prefix.clone(), self.s.salt.clone());
        let (prefix, salt) = (prefix.as_str(), salt.as_str());
        let (inflight, request) = if let Some((at_ms, record)) = self.abort_to_write(now_ms, local)
        {
            let r = record::write(prefix, salt, &record, self.revision);
            (Inflight::WriteAbort { at_ms, record }, r)
        } else if let Some((record, fleet)) = self.judged_record(now_ms) {
            let r = record::write(prefix, salt, &record, self.revision);
            (Inflight::Judge { record, fleet }, r)
        } else if self.lease.is_none() && self.s.guard.is_some() {
            // Before the poll, so that the first poll can already take the leader key.
            (Inflight::Grant, etcd::lease_grant(self.s.lease_ttl_s))
        } else if now_ms >= self.next_poll_ms {
            self.next_poll_ms = now_ms + self.s.poll_ms;
            match (self.lease, self.leader, &self.s.guard) {
                (Some(lease), false, Some(_)) => {
                    let leader = record::leader_key(prefix, salt);
                    let rec = record::record_key(prefix, salt);
                    let (poll, success) = if self.leader_absent {
                        let take = Op::Put {
                            key: &leader,
                            value: self.id.as_bytes(),
                            lease: Some(lease),
                        };
                        (Poll::Acquire, vec![take, Op::Range(&rec)])
                    } else {
                        (Poll::Probe, vec![Op::Range(&rec)])
                    };
                    let r = etcd::txn(&[Compare::Absent(&leader)], &success, &[Op::Range(&rec)]);
                    (Inflight::Poll(poll), r)
                }
                _ => (Inflight::Poll(Poll::Plain), record::read(prefix, salt)),
            }
        } else {
            let g = self.s.guard.as_ref()?;
            match self.lease {
                None => return None,
                Some(id) if now_ms >= self.renewed_ms + ttl_ms / 3 => {
                    (Inflight::Keepalive, etcd::lease_keepalive(id))
                }
                Some(id) => match local.counts {
                    Some((w, sum)) if Some(w) == self.counts_wanted(now_ms) => {
                        let key = record::counts_key(prefix, salt, &self.id);
                        let value = record::encode_counts(w, sum);
                        (Inflight::Publish(w), etcd::put(&key, &value, Some(id)))
                    }
                    _ => {
                        let t = now_ms.checked_sub(self.judge_delay_ms(g))?;
                        let w = g.window_of(t).checked_sub(1)?;
                        if !self.leader || w <= self.judged || !self.active() || self.garbage {
                            return None;
                        }
                        let counts = record::counts_prefix(prefix, salt);
                        (Inflight::Gather(w), etcd::range_prefix(&counts))
                    }
                },
            }
        };
        let step = inflight.step();
        self.inflight = Some(inflight);
        Some((step, request))
    }

    /// The local abort to write, once the record was read: the record in force is active
    /// and was not changed later than the abort.
    fn abort_to_write(&self, now_ms: u64, local: &Local) -> Option<(u64, Record)> {
        let (at_ms, reason) = local.abort?;
        let due = self.read_once
            && self.wrote_abort != Some(at_ms)
            && self.active()
            && self.in_force.updated_ms <= at_ms;
        let by = format!("envoy:{}", self.id);
        due.then(|| (at_ms, self.in_force.aborted(now_ms, &by, reason)))
    }

    /// The record with the pending fleet window judged (and aborted if that window makes
    /// `bad_windows` in a row); `None` when nothing is pending or the record moved past it.
    fn judged_record(&mut self, now_ms: u64) -> Option<(Record, FleetWindow)> {
        let g = self.s.guard.as_ref()?;
        let p = self.judge.as_ref()?;
        let base = &self.in_force;
        let done = base.window.as_ref().is_some_and(|w| w.window >= p.window);
        if done || !self.active() || self.garbage || p.attempts >= JUDGE_ATTEMPTS {
            self.judge = None;
            return None;
        }
        let j = guard::judge(g, &p.sum);
        let row = base
            .window
            .as_ref()
            .filter(|w| w.window + 1 == p.window)
            .map_or(0, |w| w.bad_windows);
        let bad_windows = if j.bad() { row + 1 } else { 0 };
        let q = g.latency.as_ref().map_or(0.99, |l| l.quantile);
        let figures = Figures::of(&p.sum, q);
        let fleet = FleetWindow {
            window: p.window,
            window_s: g.window_s,
            envoys: p.envoys,
            bad_windows,
            bad_errors: j.errors,
            bad_latency: j.latency,
            quantile: (q * 10_000.0).round() as u32,
            stable: figures.stable,
            canary: figures.canary,
        };
        let mut record = Record {
            window: Some(fleet.clone()),
            ..base.clone()
        };
        if j.bad() && bad_windows >= g.bad_windows {
            let a = Aborted {
                at_ms: now_ms,
                trigger: if j.errors {
                    Trigger::Errors
                } else {
                    Trigger::Latency
                },
                windows: bad_windows,
                figures,
            };
            let reason = format!(
                "{}, summed over {} Envoys",
                guard::describe(g, &a),
                p.envoys
            );
            record = record.aborted(now_ms, &format!("fleet:{}", self.id), &reason);
        }
        Some((record, fleet))
    }

    /// Takes the answer to the request sent last.
    pub fn answer(&mut self, now_ms: u64, a: &Answer, local: &Local) -> Vec<Event> {
        let Some(inflight) = self.inflight.take() else {
            return Vec::new();
        };
        let step = inflight.step();
        let mut events = Vec::new();
        if let Err(e) = self.take(now_ms, inflight, a, local, &mut events) {
            if e == Error::LeaseNotFound {
                self.lease = None;
                if std::mem::replace(&mut self.leader, false) {
                    events.push(Event::Leader(false));
                }
            }
            self.quiet_until_ms = now_ms + self.s.poll_ms;
            self.next_poll_ms = self.next_poll_ms.max(self.quiet_until_ms);
            events.push(Event::Failed(step, e));
        }
        events
    }

    fn take(
        &mut self,
        now_ms: u64,
        inflight: Inflight,
        a: &Answer,
        local: &Local,
        ev: &mut Vec<Event>,
    ) -> Result<(), Error> {
        match inflight {
            Inflight::Poll(poll) => {
                let (absent, kv) = match poll {
                    Poll::Plain => (false, etcd::parse_range(a)?),
                    Poll::Probe | Poll::Acquire => etcd::parse_txn_range(a)?,
                };
                self.leader_absent = poll == Poll::Probe && absent;
                if self.leader_absent {
                    // Take it now rather than a poll later: a takeover stays within one poll.
                    self.next_poll_ms = now_ms;
                }
                if poll == Poll::Acquire && absent {
                    self.leader = true;
                    ev.push(Event::Leader(true));
                }
                self.take_read(Read::of(kv.as_ref()), local, ev);
            }
            Inflight::WriteAbort { at_ms, record } => match record::parse_write(a)? {
                Written::Done(revision) => {
                    self.wrote_abort = Some(at_ms);
                    let reason = record.reason.clone();
                    self.written(record, revision, ev);
                    ev.push(Event::Wrote {
                        fleet: false,
                        reason,
                    });
                }
                Written::Lost(read) => self.take_read(read, local, ev),
            },
            Inflight::Grant => {
                let lease = etcd::parse_lease_grant(a)?;
                self.lease = Some(lease.id);
                self.renewed_ms = now_ms;
            }
            Inflight::Keepalive => {
                etcd::parse_keepalive(a)?;
                self.renewed_ms = now_ms;
            }
            Inflight::Publish(w) => {
                etcd::parse_ok(a)?;
                self.published = w;
            }
            Inflight::Gather(w) => {
                let mut sum = Window::default();
                let mut envoys = 0;
                for kv in etcd::parse_range_all(a)? {
                    if let Some((cw, counts)) = record::decode_counts(&kv.value) {
                        if cw == w {
                            sum.add(&counts);
                            envoys += 1;
                        }
                    }
                }
                self.judged = w;
                if envoys > 0 {
                    self.judge = Some(Pending {
                        window: w,
                        sum,
                        envoys,
                        attempts: 0,
                    });
                }
            }
            Inflight::Judge { record, fleet } => match record::parse_write(a)? {
                Written::Done(revision) => {
                    self.judge = None;
                    let aborted = record.state == State::Aborted && self.active();
                    let reason = record.reason.clone();
                    self.written(record, revision, ev);
                    ev.push(Event::Judged(fleet));
                    if aborted {
                        ev.push(Event::Wrote {
                            fleet: true,
                            reason,
                        });
                    }
                }
                Written::Lost(read) => {
                    if let Some(p) = self.judge.as_mut() {
                        p.attempts += 1;
                    }
                    self.take_read(read, local, ev);
                }
            },
        }
        Ok(())
    }

    /// Our own write went through: the record in force is the one written.
    fn written(&mut self, record: Record, revision: i64, ev: &mut Vec<Event>) {
        self.revision = Some(revision);
        self.read_once = true;
        self.garbage = false;
        if record != self.in_force {
            self.in_force = record;
            ev.push(Event::Changed);
        }
    }

    fn take_read(&mut self, read: Read, local: &Local, ev: &mut Vec<Event>) {
        self.revision = read.revision;
        self.read_once = true;
        match read.record {
            Some(Err(e)) => {
                self.garbage = true;
                ev.push(Event::Garbage(e));
            }
            found => {
                self.garbage = false;
                let record = found.and_then(Result::ok).unwrap_or_else(Record::absent);
                if record != self.in_force {
                    self.in_force = record;
                    ev.push(Event::Changed);
                }
            }
        }
        if let Some((at_ms, _)) = local.abort {
            if self.active() && self.in_force.updated_ms > at_ms {
                ev.push(Event::ResumeLocal);
            }
        }
    }
}
