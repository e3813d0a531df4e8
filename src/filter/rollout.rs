//! Fleet rollout control glue. Every worker takes part in the poller lease at its root tick;
//! the worker holding it drives this Envoy's [`Flow`] (one etcd callout at a time from its
//! root context, never from a request) and writes the record's [`Control`] into shared data;
//! every worker applies what shared data holds at its next tick. Requests only read a cell.

use log::{info, warn};
use std::cell::Cell;
use std::rc::Rc;

use super::guard::{local_abort, now_us, resume_local, window_counts};
use super::host::{call_answer, etcd_call, random_bytes};
use super::shared::HostShared;
use super::Root;
use crate::config::Config;
use crate::etcd::{Answer, Error};
use crate::guard::experiment_id;
use crate::rollout::flow::{Event, Flow, Local, Settings, Step};
use crate::rollout::record::State;
use crate::rollout::{poller, Control, EtcdControl};
use crate::shared::{update, SharedData, Step as Write, Update};

const ID_KEY: &str = "handoff.rollout.id";
const POLLER_PREFIX: &str = "handoff.rollout.poller.";
const CONTROL_PREFIX: &str = "handoff.rollout.control.";
const CAS_RETRIES: usize = 8;
/// At most one etcd error line per this long (every error is counted).
const ERROR_LOG_EVERY_MS: u64 = 30_000;

pub struct RootRollout {
    /// What this worker applies, as of its last tick (read by every request).
    control: Rc<Cell<Control>>,
    worker_id: u64,
    flow: Option<Flow>,
    /// The callout out for the flow.
    token: Option<u32>,
    /// Whether this worker held the poller lease at its last tick.
    poller: bool,
    /// When an etcd error was last logged, and the errors since.
    logged_ms: u64,
    unlogged: u64,
    failing: bool,
}

impl RootRollout {
    pub fn new() -> RootRollout {
        let b = random_bytes();
        RootRollout {
            control: Rc::new(Cell::new(Control::default())),
            worker_id: u64::from_le_bytes(b[..8].try_into().unwrap_or_default()).max(1),
            flow: None,
            token: None,
            poller: false,
            logged_ms: 0,
            unlogged: 0,
            failing: false,
        }
    }

    /// What a request applies.
    pub fn http(&self) -> Rc<Cell<Control>> {
        self.control.clone()
    }
}

fn control_of(config: &Config) -> Option<&EtcdControl> {
    config.canary.as_ref()?.control.as_ref()
}

fn keys(config: &Config) -> Option<(String, String)> {
    let c = config.canary.as_ref()?;
    let e = hex::encode(experiment_id(&c.salt).to_be_bytes());
    Some((
        format!("{POLLER_PREFIX}{e}"),
        format!("{CONTROL_PREFIX}{e}"),
    ))
}

/// The root tick the control needs, if configured.
pub fn tick_ms(config: &Config) -> Option<u64> {
    control_of(config).map(EtcdControl::tick_ms)
}

/// Every read-modify-write of this module through one instance of the shared CAS loop.
fn swap(key: &str, f: &mut dyn FnMut(Option<&[u8]>) -> Write<bool>) -> Update<bool> {
    update(&HostShared, key, CAS_RETRIES, f)
}

/// This Envoy's id: 16 hex digits made once per process, shared by its workers.
fn envoy_id() -> String {
    let mut id = hex::encode(&random_bytes()[..8]);
    swap(ID_KEY, &mut |v| match v {
        Some(b) if b.len() == 16 => {
            id = String::from_utf8_lossy(b).into_owned();
            Write::Keep(false)
        }
        _ => Write::Write(id.clone().into_bytes(), true),
    });
    id
}

/// After `on_configure` accepted a configuration: a new flow (a changed prefix or salt is
/// another record), and the control shared data holds applied at once.
pub fn configure(root: &mut Root) {
    let config = root.config.clone();
    let (Some(e), Some(c)) = (control_of(&config), config.canary.as_ref()) else {
        root.rollout.flow = None;
        return;
    };
    root.rollout.flow = Some(Flow::new(
        envoy_id(),
        Settings {
            prefix: e.prefix.clone(),
            salt: c.salt.clone(),
            poll_ms: e.poll_ms,
            timeout_ms: e.timeout_ms,
            lease_ttl_s: e.lease_ttl_s,
            guard: c.guard.clone(),
        },
    ));
    root.rollout.token = None;
    apply_shared(root);
}

fn apply_shared(root: &Root) {
    let Some((_, control_key)) = keys(&root.config) else {
        return;
    };
    let c = HostShared
        .get(&control_key)
        .0
        .and_then(|b| Control::decode(&b))
        .unwrap_or_default();
    root.rollout.control.set(c);
    root.metrics.rollout_state(c.aborted);
}

pub fn on_tick(root: &mut Root) {
    let Some(e) = control_of(&root.config).cloned() else {
        return;
    };
    let Some((poller_key, _)) = keys(&root.config) else {
        return;
    };
    let now = now_us() / 1000;
    let hold = 3 * e.tick_ms() + e.timeout_ms;
    let me = root.rollout.worker_id;
    let held = swap(&poller_key, &mut |v| poller(v, me, now, hold));
    root.rollout.poller = matches!(held, Update::Written(true));
    if root.rollout.poller {
        drive(root, now);
        let leader = root.rollout.flow.as_ref().is_some_and(Flow::leader);
        root.metrics.rollout_leader(leader);
    }
    apply_shared(root);
}

/// Sends the flow's next request, if one is due and none is out.
fn drive(root: &mut Root, now: u64) {
    let config = root.config.clone();
    let Some(e) = control_of(&config) else {
        return;
    };
    if root.rollout.token.is_some() {
        return;
    }
    let abort = local_abort(&config);
    let wanted = root
        .rollout
        .flow
        .as_ref()
        .and_then(|f| f.counts_wanted(now));
    let counts = wanted.and_then(|w| window_counts(root, w, now).map(|c| (w, c)));
    let local = Local {
        abort: abort.as_ref().map(|(at, r)| (*at, r.as_str())),
        counts: counts.as_ref().map(|(w, c)| (*w, c)),
    };
    let Some(flow) = root.rollout.flow.as_mut() else {
        return;
    };
    let Some((step, request)) = flow.next(now, &local) else {
        return;
    };
    root.metrics.rollout_request(step.kind());
    match etcd_call(&*root, &e.cluster, &e.authority, e.timeout_ms, &request) {
        Ok(token) => root.rollout.token = Some(token),
        // The cluster is missing or Envoy refused the call: an error like no answer.
        Err(_) => answered(root, now, (None, Vec::new()), abort.clone()),
    }
}

/// An answer to a root callout: the flow's, if its token.
pub fn on_root_call_response(root: &mut Root, token: u32, num_headers: usize, body_size: usize) {
    if root.rollout.token != Some(token) {
        return;
    }
    root.rollout.token = None;
    let answer = call_answer(&*root, num_headers, body_size);
    let now = now_us() / 1000;
    answered(root, now, answer, local_abort(&root.config));
    // The next step (a write after a lost race, the counts after the lease) goes at once,
    // unless another worker took over the polling meanwhile.
    if root.rollout.poller {
        drive(root, now);
    }
}

/// Hands an answer to the flow and applies what it says (the answer needs only the local
/// abort: counts are for sending).
fn answered(
    root: &mut Root,
    now: u64,
    (status, body): (Option<u16>, Vec<u8>),
    abort: Option<(u64, String)>,
) {
    let local = Local {
        abort: abort.as_ref().map(|(at, r)| (*at, r.as_str())),
        counts: None,
    };
    let Some(flow) = root.rollout.flow.as_mut() else {
        return;
    };
    let before = flow.control();
    let events = flow.answer(
        now,
        &Answer {
            status,
            body: &body,
        },
        &local,
    );
    let (id, record) = (flow.id.clone(), flow.record().clone());
    let control = flow.control();
    let mut failed = false;
    for ev in events {
        match ev {
            Event::Changed => {}
            Event::ResumeLocal => resume_local(root),
            Event::Wrote { fleet: true, .. } => root.metrics.rollout_fleet_abort(),
            Event::Wrote { fleet: false, .. } => {
                info!("handoff: rollout: this Envoy's guard abort is in the fleet's record")
            }
            Event::Judged(_) => root.metrics.rollout_fleet_window(),
            Event::Leader(true) => info!("handoff: rollout: Envoy {id} judges the fleet"),
            Event::Leader(false) => {
                info!("handoff: rollout: Envoy {id} no longer judges the fleet")
            }
            Event::Failed(step, e) => {
                failed = true;
                etcd_error(root, now, step, &e);
            }
            Event::Garbage(e) => {
                root.metrics.rollout_error("record");
                warn!("handoff: rollout: the record is not readable ({e}); the last one stays in force");
            }
        }
    }
    if !failed && std::mem::replace(&mut root.rollout.failing, false) {
        info!(
            "handoff: rollout: etcd answers again ({} errors not logged)",
            std::mem::take(&mut root.rollout.unlogged)
        );
    }
    if control != before {
        publish(root, control);
        announce(before, control, &record);
    }
}

/// One line for what changed, when this Envoy learns it.
fn announce(before: Control, now: Control, r: &crate::rollout::record::Record) {
    let by = &r.by;
    if now.aborted && !before.aborted {
        let who = if by.starts_with("fleet:") {
            "by the fleet judgment"
        } else if by.starts_with("envoy:") {
            "by an Envoy's local guard"
        } else {
            "by the operator"
        };
        warn!(
            "handoff: canary aborted fleet-wide {who} ({by}): {}",
            r.reason
        );
    } else if before.aborted && !now.aborted {
        info!("handoff: canary resumed fleet-wide ({by})");
    }
    if now.threshold != before.threshold && r.state == State::Active {
        match now.threshold {
            Some(t) => info!(
                "handoff: canary percent {}.{:02}% from the fleet's record ({by})",
                t / 100,
                t % 100
            ),
            None => info!("handoff: canary percent back to the configured one ({by})"),
        }
    }
}

/// Writes the control for every worker of this Envoy.
fn publish(root: &Root, control: Control) {
    let Some((_, key)) = keys(&root.config) else {
        return;
    };
    let bytes = control.encode();
    let out = swap(&key, &mut |v| match v {
        Some(b) if b == bytes.as_slice() => Write::Keep(false),
        _ => Write::Write(bytes.clone(), true),
    });
    if let Update::Failed(e) = out {
        warn!("handoff: rollout: control not shared with the other workers: {e:?}");
    }
    root.rollout.control.set(control);
}

fn etcd_error(root: &mut Root, now: u64, step: Step, e: &Error) {
    let kind = match e {
        Error::Unreachable => "unreachable",
        Error::Server { .. } => "server",
        Error::LeaseNotFound => "lease",
        Error::Malformed => "malformed",
    };
    root.metrics.rollout_error(kind);
    let r = &mut root.rollout;
    r.failing = true;
    if now < r.logged_ms + ERROR_LOG_EVERY_MS && r.logged_ms > 0 {
        r.unlogged += 1;
        return;
    }
    r.logged_ms = now;
    warn!(
        "handoff: rollout: etcd {} failed: {e} (the last record read stays in force; {} more \
         errors since the last line)",
        step.as_str(),
        std::mem::take(&mut r.unlogged)
    );
}
