//! Fleet-wide rollout control: one record in etcd that every Envoy of the fleet reads (abort,
//! resume, percent), written by any Envoy whose guard aborts, and one fleet judgment of the
//! summed window counts by an elected Envoy. Pure: the filter performs the etcd requests and
//! applies the decisions; `handoffctl rollout` and the host simulation use the same code.
//!
//! Inside one Envoy, one worker at a time talks to etcd (the poller, holding a lease in shared
//! data, see [`poller`]); it writes what the record says into shared data ([`Control`]) and
//! every worker applies that at its next tick.

pub mod flow;
pub mod record;

use crate::canary::{Assignment, Reason, Variant};
use crate::shared::Step;

/// `canary.control.etcd`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdControl {
    pub cluster: String,
    pub authority: String,
    pub prefix: String,
    pub poll_ms: u64,
    pub timeout_ms: u64,
    pub lease_ttl_s: u64,
}

impl EtcdControl {
    /// The root tick this needs: the poll happens on a tick, so the fleet moves within
    /// `poll_ms` and a tick or two.
    pub fn tick_ms(&self) -> u64 {
        (self.poll_ms / 2).clamp(50, 500)
    }
}

/// What the record in force says, as every worker applies it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Control {
    /// Everyone to stable, as the guard's abort does.
    pub aborted: bool,
    /// The canary threshold in buckets of 10,000 (hundredths of a percent) replacing the
    /// configured one.
    pub threshold: Option<u32>,
}

const CONTROL_VERSION: u8 = 1;

impl Control {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![CONTROL_VERSION, u8::from(self.aborted)];
        if let Some(t) = self.threshold {
            out.extend_from_slice(&t.to_le_bytes());
        }
        out
    }

    pub fn decode(b: &[u8]) -> Option<Control> {
        match b {
            [CONTROL_VERSION, a @ (0 | 1)] => Some(Control {
                aborted: *a == 1,
                threshold: None,
            }),
            [CONTROL_VERSION, a @ (0 | 1), t @ ..] => Some(Control {
                aborted: *a == 1,
                threshold: Some(u32::from_le_bytes(t.try_into().ok()?)),
            }),
            _ => None,
        }
    }

    /// The assignment under this control: an abort as the guard's; a percent moves only the
    /// users the hash placed (the same bucket formula, so raising it only moves users from
    /// stable to canary, lowering it only from canary to stable). Allow, deny, overrides and
    /// unidentified requests keep their variant.
    pub fn apply(&self, a: Assignment) -> Assignment {
        if self.aborted {
            return a.aborted();
        }
        match (self.threshold, a.bucket, a.reason) {
            (Some(t), Some(b), Reason::Hash | Reason::Anonymous) => Assignment {
                variant: if b < t {
                    Variant::Canary
                } else {
                    Variant::Stable
                },
                ..a
            },
            _ => a,
        }
    }
}

/// The poller lease of one Envoy's workers: who talks to etcd, until when. `Write` to take
/// or renew it (free, expired or ours), `Keep(false)` while another worker holds it.
pub fn poller(existing: Option<&[u8]>, me: u64, now_ms: u64, hold_ms: u64) -> Step<bool> {
    let held = existing.and_then(|b| {
        let b: [u8; 16] = b.try_into().ok()?;
        let owner = u64::from_le_bytes(b[..8].try_into().ok()?);
        let until = u64::from_le_bytes(b[8..].try_into().ok()?);
        Some((owner, until))
    });
    match held {
        Some((owner, until)) if owner != me && now_ms < until => Step::Keep(false),
        _ => {
            let mut v = me.to_le_bytes().to_vec();
            v.extend_from_slice(&(now_ms + hold_ms).to_le_bytes());
            Step::Write(v, true)
        }
    }
}

#[cfg(test)]
mod flow_tests;
#[cfg(test)]
mod tests;
