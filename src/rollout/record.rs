//! The rollout record and the keys around it, as every reader and writer of the prefix sees
//! them: the filter, `handoffctl rollout` and the host simulation share this file.
//!
//! Keys (`P` the prefix, `S` the canary salt, `ID` an Envoy's 16 hex digits):
//! - `P S`: the record, one JSON object (see [`Record`]);
//! - `P S /counts/ ID`: an Envoy's counts of its last finished window, put with its lease;
//! - `P S /leader`: the id of the Envoy judging the fleet's windows, held with its lease.
//!
//! Every write of the record is a compare-and-swap on the `mod_revision` it was read at
//! (`create_revision == 0` when it was absent), whose failure branch reads the record again,
//! so a writer that lost its race learns the new value in the same round trip.

use serde_json::Value;

use crate::etcd::{self, Answer, Compare, Kv, Op, Request, Txn};
use crate::guard::{Cohort, Figure, Reader, Window};

pub const DEFAULT_PREFIX: &str = "/handoff/rollout/";
/// A reason is cut to this many bytes when written (the record stays small).
pub const MAX_REASON: usize = 500;

pub fn record_key(prefix: &str, salt: &str) -> String {
    format!("{prefix}{salt}")
}

/// Where every Envoy's counts live: one range over this prefix reads them all.
pub fn counts_prefix(prefix: &str, salt: &str) -> String {
    format!("{prefix}{salt}/counts/")
}

pub fn counts_key(prefix: &str, salt: &str, id: &str) -> String {
    format!("{prefix}{salt}/counts/{id}")
}

pub fn leader_key(prefix: &str, salt: &str) -> String {
    format!("{prefix}{salt}/leader")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Active,
    Aborted,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Active => "active",
            State::Aborted => "aborted",
        }
    }
}

/// The rollout record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub state: State,
    /// The percent in force in hundredths (3000 is 30%), replacing the configured one; `None`:
    /// the configured percent.
    pub percent: Option<u32>,
    /// Unix ms of the last change of state or percent.
    pub updated_ms: u64,
    /// Who made that change: `handoffctl`, `envoy:ID` (a local guard abort) or `fleet:ID`
    /// (the fleet judgment).
    pub by: String,
    pub reason: String,
    /// The last fleet window judged.
    pub window: Option<FleetWindow>,
}

/// The fleet's last judged window, as the judge wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetWindow {
    /// The window's index: it started at `window * window_s` seconds after the epoch.
    pub window: u64,
    pub window_s: u32,
    /// How many Envoys' counts were summed.
    pub envoys: u32,
    /// Bad windows in a row up to this one (0: this one was not bad). A new judge continues
    /// the row from here.
    pub bad_windows: u32,
    pub bad_errors: bool,
    pub bad_latency: bool,
    /// The latency quantile of the figures, in ten-thousandths (9900 is p99).
    pub quantile: u32,
    /// Requests, errors and the quantile latency in µs (written as ms).
    pub stable: Figure,
    pub canary: Figure,
}

impl Record {
    /// What a missing record means: active at the configured percent.
    pub fn absent() -> Record {
        Record {
            state: State::Active,
            percent: None,
            updated_ms: 0,
            by: String::new(),
            reason: String::new(),
            window: None,
        }
    }

    /// This record aborted (the fleet window kept).
    pub fn aborted(&self, now_ms: u64, by: &str, reason: &str) -> Record {
        Record {
            state: State::Aborted,
            updated_ms: now_ms,
            by: by.to_string(),
            reason: reason.to_string(),
            ..self.clone()
        }
    }

    /// This record active again (percent and fleet window kept).
    pub fn resumed(&self, now_ms: u64, by: &str) -> Record {
        Record {
            state: State::Active,
            updated_ms: now_ms,
            by: by.to_string(),
            reason: String::new(),
            ..self.clone()
        }
    }

    /// This record with another percent (in hundredths).
    pub fn with_percent(&self, hundredths: u32, now_ms: u64, by: &str) -> Record {
        Record {
            percent: Some(hundredths.min(10_000)),
            updated_ms: now_ms,
            by: by.to_string(),
            ..self.clone()
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = format!(r#"{{"state":"{}""#, self.state.as_str());
        if let Some(p) = self.percent {
            out.push_str(&format!(r#","percent":{}"#, hundredths(u64::from(p), 2)));
        }
        let end = (0..=self.reason.len().min(MAX_REASON))
            .rev()
            .find(|i| self.reason.is_char_boundary(*i))
            .unwrap_or(0);
        out.push_str(&format!(
            r#","updated_ms":{},"by":{},"reason":{}"#,
            self.updated_ms,
            quote(&self.by),
            quote(&self.reason[..end])
        ));
        if let Some(w) = &self.window {
            let fig = |f: &Figure| {
                format!(
                    r#"{{"requests":{},"errors":{},"quantile_ms":{}}}"#,
                    f.requests,
                    f.errors,
                    hundredths(f.quantile_us, 3)
                )
            };
            out.push_str(&format!(
                r#","window":{{"window":{},"window_s":{},"envoys":{},"bad_windows":{},"bad_errors":{},"bad_latency":{},"quantile":{},"stable":{},"canary":{}}}"#,
                w.window,
                w.window_s,
                w.envoys,
                w.bad_windows,
                w.bad_errors,
                w.bad_latency,
                hundredths(u64::from(w.quantile), 4),
                fig(&w.stable),
                fig(&w.canary)
            ));
        }
        out.push('}');
        out.into_bytes()
    }

    /// Reads a record; any bytes that are not one (not JSON, a field of the wrong type, a
    /// percent out of range) are an error naming the field, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<Record, String> {
        let v = crate::json::value(bytes)?;
        // One message for every field: the wasm carries one format, not one per field.
        Record::read(&v).map_err(|field| format!("{field}: not the expected type or range"))
    }

    fn read(v: &Value) -> Result<Record, &'static str> {
        let o = v.as_object().ok_or("the record (a JSON object)")?;
        let state = match o.get("state").and_then(Value::as_str) {
            Some("active") => State::Active,
            Some("aborted") => State::Aborted,
            _ => return Err("state (\"active\" or \"aborted\")"),
        };
        let percent = match o.get("percent") {
            None | Some(Value::Null) => None,
            Some(p) => Some(percent_of(p).ok_or("percent (0 to 100)")?),
        };
        let window = match o.get("window") {
            None | Some(Value::Null) => None,
            Some(w) => Some(FleetWindow::read(w.as_object().ok_or("window")?)?),
        };
        Ok(Record {
            state,
            percent,
            updated_ms: uint(o, "updated_ms", "updated_ms")?,
            by: text(o, "by")?,
            reason: text(o, "reason")?,
            window,
        })
    }
}

type Object = serde_json::Map<String, Value>;

impl FleetWindow {
    fn read(o: &Object) -> Result<FleetWindow, &'static str> {
        let small = |name, path| uint(o, name, path).map(|n| n.min(u64::from(u32::MAX)) as u32);
        let flag = |name| o.get(name).and_then(Value::as_bool).unwrap_or(false);
        let q = o.get("quantile").and_then(Value::as_f64).unwrap_or(0.99);
        Ok(FleetWindow {
            window: uint(o, "window", "window.window")?,
            window_s: small("window_s", "window.window_s")?,
            envoys: small("envoys", "window.envoys")?,
            bad_windows: small("bad_windows", "window.bad_windows")?,
            bad_errors: flag("bad_errors"),
            bad_latency: flag("bad_latency"),
            quantile: (q.clamp(0.0, 1.0) * 10_000.0).round() as u32,
            stable: figure(o, "stable", "window.stable")?,
            canary: figure(o, "canary", "window.canary")?,
        })
    }
}

fn figure(o: &Object, name: &str, path: &'static str) -> Result<Figure, &'static str> {
    let f = o.get(name).and_then(Value::as_object).ok_or(path)?;
    let ms = f.get("quantile_ms").and_then(Value::as_f64).unwrap_or(0.0);
    Ok(Figure {
        requests: uint(f, "requests", path)?,
        errors: uint(f, "errors", path)?,
        quantile_us: (ms.max(0.0) * 1000.0).round() as u64,
    })
}

/// A whole number, 0 when absent; else the error names `path`.
fn uint(o: &Object, name: &str, path: &'static str) -> Result<u64, &'static str> {
    match o.get(name) {
        None | Some(Value::Null) => Ok(0),
        Some(n) => n.as_u64().ok_or(path),
    }
}

fn text(o: &Object, name: &'static str) -> Result<String, &'static str> {
    match o.get(name) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        _ => Err(name),
    }
}

/// A percent in hundredths (the canary threshold), as the configuration rounds it.
fn percent_of(v: &Value) -> Option<u32> {
    let p = v.as_f64()?;
    (0.0..=100.0)
        .contains(&p)
        .then(|| crate::canary::threshold(p))
}

/// `n / 10^digits` as a JSON number, trailing zeros dropped (no float formatting: it would
/// cost the wasm kilobytes).
fn hundredths(n: u64, digits: u32) -> String {
    let scale = 10u64.pow(digits);
    let frac = n % scale;
    if frac == 0 {
        return (n / scale).to_string();
    }
    let f = format!("{frac:0width$}", width = digits as usize);
    format!("{}.{}", n / scale, f.trim_end_matches('0'))
}

/// A JSON string literal.
fn quote(s: &str) -> String {
    String::from_utf8(serde_json::to_vec(s).unwrap_or_default()).unwrap_or_default()
}

/// What a read of the record found: the record (`None`: absent) and the `mod_revision` a
/// write must compare (`None`: absent, so a write must find it still absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    pub record: Option<Result<Record, String>>,
    pub revision: Option<i64>,
}

impl Read {
    pub fn of(kv: Option<&Kv>) -> Read {
        match kv {
            Some(kv) => Read {
                record: Some(Record::decode(&kv.value)),
                revision: Some(kv.mod_revision),
            },
            None => Read {
                record: None,
                revision: None,
            },
        }
    }

    /// The record in force: absent is active at the configured percent; a value that is not a
    /// record is `None` (the reader keeps what it had).
    pub fn in_force(&self) -> Option<Record> {
        match &self.record {
            None => Some(Record::absent()),
            Some(r) => r.as_ref().ok().cloned(),
        }
    }
}

/// Reads the record (answer: [`parse_read`]).
pub fn read(prefix: &str, salt: &str) -> Request {
    etcd::range(&record_key(prefix, salt))
}

pub fn parse_read(a: &Answer) -> Result<Read, etcd::Error> {
    Ok(Read::of(etcd::parse_range(a)?.as_ref()))
}

/// Writes `record` if the record is still at `revision` (`None`: still absent); else reads it
/// (answer: [`parse_write`]).
pub fn write(prefix: &str, salt: &str, record: &Record, revision: Option<i64>) -> Request {
    let key = record_key(prefix, salt);
    let compare = match revision {
        Some(r) => Compare::ModRevision(&key, r),
        None => Compare::Absent(&key),
    };
    let value = record.encode();
    let put = Op::Put {
        key: &key,
        value: &value,
        lease: None,
    };
    etcd::txn(&[compare], &[put], &[Op::Range(&key)])
}

/// A compare-and-swap's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// Written; the record's new `mod_revision`.
    Done(i64),
    /// The record changed underneath: what it is now.
    Lost(Read),
}

pub fn parse_write(a: &Answer) -> Result<Written, etcd::Error> {
    Ok(match etcd::parse_txn(a)? {
        Txn::Succeeded { revision } => Written::Done(revision),
        Txn::Failed { kv } => Written::Lost(Read::of(kv.as_ref())),
    })
}

// ---------------------------------------------------------------------------------------------
// Counts: one Envoy's summed window, as the judge sums them

const COUNTS_VERSION: u8 = 1;

/// `window`'s counts as an etcd value: a version byte, the window index, then per cohort
/// (stable, canary) requests, errors and the non-empty latency buckets as (index, count).
pub fn encode_counts(window: u64, w: &Window) -> Vec<u8> {
    let mut out = vec![COUNTS_VERSION];
    out.extend_from_slice(&window.to_le_bytes());
    for c in [&w.stable, &w.canary] {
        out.extend_from_slice(&c.requests.to_le_bytes());
        out.extend_from_slice(&c.errors.to_le_bytes());
        let used = c.buckets.iter().filter(|b| **b > 0).count();
        out.push(used as u8);
        for (i, b) in c.buckets.iter().enumerate().filter(|(_, b)| **b > 0) {
            out.push(i as u8);
            out.extend_from_slice(&b.to_le_bytes());
        }
    }
    out
}

/// The window index and counts of a counts value; `None` for anything else.
pub fn decode_counts(b: &[u8]) -> Option<(u64, Window)> {
    let mut r = Reader::versioned(b, COUNTS_VERSION)?;
    let window = r.u64()?;
    let mut w = Window::default();
    for c in [&mut w.stable, &mut w.canary] {
        *c = Cohort {
            requests: r.u64()?,
            errors: r.u64()?,
            ..Cohort::default()
        };
        for _ in 0..r.u8()? {
            let i = usize::from(r.u8()?);
            *c.buckets.get_mut(i)? = r.u32()?;
        }
    }
    r.done().then_some((window, w))
}
