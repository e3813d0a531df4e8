//! `handoffctl rollout status|abort|resume|set-percent`: the operator's side of fleet rollout
//! control. The record at `<prefix><salt>` is read and written exactly as the filter does it
//! (the library's record type and etcd requests); every write is a compare-and-swap on the
//! revision that was read, so a change made meanwhile (by another operator or by an Envoy's
//! guard) is never overwritten: the command fails and says to look again.

use crate::app::{Failure, Options};
use crate::gateway::{Gateway, Settings};
use handoff::etcd::{self, Compare, Kv, Op, Txn};
use provisional as record;
use record::{Record, State};
use std::time::{SystemTime, UNIX_EPOCH};

const DEFAULT_PREFIX: &str = "/handoff/rollout/";
/// Who the records written here name as their author.
const BY: &str = "handoffctl";

const CONNECTION: [&str; 8] = [
    "etcd", "salt", "prefix", "cacert", "cert", "key", "user", "reason",
];

pub fn command(args: &[String]) -> Result<(), Failure> {
    let Some((sub, rest)) = args.split_first() else {
        return Err(Failure::usage(
            "rollout: missing command (status, abort, resume, set-percent); see handoffctl --help",
        ));
    };
    let (name, flags): (&'static str, &[&str]) = match sub.as_str() {
        "status" => ("rollout status", &["json"]),
        "abort" => ("rollout abort", &[]),
        "resume" => ("rollout resume", &[]),
        "set-percent" => ("rollout set-percent", &[]),
        "-h" | "--help" => {
            return Options::parse("rollout", args, &[], &[]).map(|_| ());
        }
        other => {
            return Err(Failure::usage(format!(
                "rollout: unknown command `{other}` (status, abort, resume, set-percent); see handoffctl --help"
            )))
        }
    };
    let with_value: &[&str] = if sub == "abort" {
        &CONNECTION
    } else {
        &CONNECTION[..7]
    };
    let opts = Options::parse(name, rest, with_value, flags)?;
    let percent = if sub == "set-percent" {
        let [p] = &opts.positional[..] else {
            return Err(Failure::usage(
                "rollout set-percent: expected one PERCENT (0 to 100); see handoffctl --help",
            ));
        };
        Some(parse_percent(p)?)
    } else {
        opts.no_positional()?;
        None
    };
    let salt = opts.required("salt")?;
    if salt.is_empty() {
        return Err(Failure::usage(format!("{name}: --salt must not be empty")));
    }
    let prefix = opts.get("prefix").unwrap_or(DEFAULT_PREFIX);
    if !(prefix.starts_with('/') && prefix.ends_with('/')) {
        return Err(Failure::usage(format!(
            "{name}: --prefix must start and end with `/`, got `{prefix}`"
        )));
    }
    let settings = Settings {
        url: opts.required("etcd")?,
        cacert: opts.get("cacert"),
        cert: opts.get("cert"),
        key: opts.get("key"),
        user: opts.get("user"),
    };
    let gateway = Gateway::connect(&settings)?;
    let key = record::record_key(prefix, salt);
    let found = read(&gateway, &key)?;
    match sub.as_str() {
        "status" => status(&key, found.as_ref(), opts.flag("json")),
        "abort" => {
            let reason = opts.get("reason").unwrap_or("aborted with handoffctl");
            let mut r = found.as_ref().map_or_else(Record::default, |f| f.1.clone());
            r.state = State::Aborted;
            r.reason = reason.to_string();
            write(&gateway, &key, found.as_ref(), r)?;
            println!("aborted: every Envoy sends every user to stable within its poll_ms");
            Ok(())
        }
        "resume" => {
            let Some((kv, current)) = found.as_ref().filter(|(_, r)| r.state == State::Aborted)
            else {
                println!("already active: nothing to do");
                return Ok(());
            };
            let mut r = current.clone();
            r.state = State::Active;
            r.reason = "resumed with handoffctl".to_string();
            write(&gateway, &key, Some(&(kv.clone(), current.clone())), r)?;
            println!("resumed: the cohorts are back as they were before the abort");
            Ok(())
        }
        _ => {
            let percent = percent.unwrap_or_default();
            let mut r = found.as_ref().map_or_else(Record::default, |f| f.1.clone());
            r.percent = Some(percent);
            r.reason = format!("percent set to {percent} with handoffctl");
            let aborted = r.state == State::Aborted;
            write(&gateway, &key, found.as_ref(), r)?;
            if aborted {
                println!(
                    "percent: {percent} (the rollout is aborted: everyone stays on stable until `handoffctl rollout resume`)"
                );
            } else {
                println!("percent: {percent}");
            }
            Ok(())
        }
    }
}

fn parse_percent(p: &str) -> Result<f64, Failure> {
    match p.parse::<f64>() {
        Ok(v) if (0.0..=100.0).contains(&v) => Ok(v),
        _ => Err(Failure::usage(format!(
            "rollout set-percent: PERCENT must be a number from 0 to 100, got `{p}`"
        ))),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The record and the key's revisions, `None` when there is no record.
fn read(gateway: &Gateway, key: &str) -> Result<Option<(Kv, Record)>, Failure> {
    let Some(kv) = gateway.call(&etcd::range(key), etcd::parse_range)? else {
        return Ok(None);
    };
    let record = record::decode(&kv.value).ok_or_else(|| {
        Failure::invalid(format!(
            "{key} does not hold a rollout record: {}",
            String::from_utf8_lossy(&kv.value[..kv.value.len().min(120)])
        ))
    })?;
    Ok(Some((kv, record)))
}

/// Writes `next` if the key is still at the revision `read` saw (absent when `read` is
/// `None`), stamped now and by handoffctl.
fn write(
    gateway: &Gateway,
    key: &str,
    read: Option<&(Kv, Record)>,
    mut next: Record,
) -> Result<(), Failure> {
    next.updated_ms = now_ms();
    next.by = BY.to_string();
    let value = record::encode(&next);
    let compare = match read {
        Some((kv, _)) => Compare::ModRevision(key, kv.mod_revision),
        None => Compare::Absent(key),
    };
    let put = Op::Put {
        key,
        value: &value,
        lease: None,
    };
    match gateway.call(&etcd::txn(&[compare], &[put], &[]), etcd::parse_txn)? {
        Txn::Succeeded { .. } => Ok(()),
        Txn::Failed { .. } => Err(Failure::changed_underneath()),
    }
}

fn status(key: &str, found: Option<&(Kv, Record)>, json: bool) -> Result<(), Failure> {
    if json {
        let out = match found {
            Some((kv, _)) => {
                let stored: serde_json::Value =
                    serde_json::from_slice(&kv.value).unwrap_or(serde_json::Value::Null);
                serde_json::json!({"key": key, "mod_revision": kv.mod_revision, "record": stored})
            }
            None => serde_json::json!({"key": key, "record": null}),
        };
        println!("{out}");
        return Ok(());
    }
    let Some((_, r)) = found else {
        println!("no record: active at the configured percent");
        return Ok(());
    };
    println!("state: {}", r.state.as_str());
    match r.percent {
        Some(p) => println!("percent: {p}"),
        None => println!("percent: configured"),
    }
    println!("updated: {}", utc(r.updated_ms));
    println!("by: {}", r.by);
    if !r.reason.is_empty() {
        println!("reason: {}", r.reason);
    }
    Ok(())
}

/// `updated_ms` as an RFC 3339 UTC time (the number itself when it is out of range).
fn utc(ms: u64) -> String {
    let formatted = i128::from(ms)
        .checked_mul(1_000_000)
        .and_then(|ns| time::OffsetDateTime::from_unix_timestamp_nanos(ns).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        });
    match formatted {
        Some(t) => format!("{t} ({ms} ms)"),
        None => format!("{ms} ms"),
    }
}

/// A stand-in for the library's record module until it lands.
mod provisional {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
    #[serde(rename_all = "lowercase")]
    pub enum State {
        #[default]
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

    #[derive(Debug, Clone, Default, Serialize, Deserialize)]
    pub struct Record {
        pub state: State,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub percent: Option<f64>,
        #[serde(default)]
        pub updated_ms: u64,
        #[serde(default)]
        pub by: String,
        #[serde(default)]
        pub reason: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub window: Option<serde_json::Value>,
    }

    pub fn record_key(prefix: &str, salt: &str) -> String {
        format!("{prefix}{salt}")
    }

    pub fn encode(r: &Record) -> Vec<u8> {
        serde_json::to_vec(r).unwrap_or_default()
    }

    pub fn decode(b: &[u8]) -> Option<Record> {
        serde_json::from_slice(b).ok()
    }
}
