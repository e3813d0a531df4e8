//! `handoffctl rollout status|abort|resume|set-percent`: the operator's side of fleet rollout
//! control. The record at `<prefix><salt>` is read and written exactly as the filter does it
//! (the library's record type and etcd requests); every write is a compare-and-swap on the
//! revision that was read, so a change made meanwhile (by another operator or by an Envoy's
//! guard) is never overwritten: the command fails and says to look again.

use crate::app::{Failure, Options};
use crate::gateway::{Gateway, Settings};
use handoff::guard::quantile_label;
use handoff::rollout::record::{self, FleetWindow, Read, Record, State, Written, DEFAULT_PREFIX};
use std::time::{SystemTime, UNIX_EPOCH};

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
    let read = gateway.call(&record::read(prefix, salt), record::parse_read)?;
    let key = record::record_key(prefix, salt);
    let now = now_ms();
    let next = match sub.as_str() {
        "status" => {
            let fleet = Fleet::read(&gateway, prefix, salt)?;
            return status(&gateway, &key, &read, &fleet, opts.flag("json"));
        }
        "abort" => {
            let reason = opts.get("reason").unwrap_or("aborted with handoffctl");
            // An emergency brake works even over a value no reader understands (the Envoys
            // keep what they had while it is there); the write still compares its revision.
            let current = read.in_force().unwrap_or_else(Record::absent);
            current.aborted(now, BY, reason)
        }
        "resume" => {
            let current = in_force(&key, &read)?;
            if current.state == State::Active {
                println!("already active: nothing to do");
                return Ok(());
            }
            current.resumed(now, BY)
        }
        _ => in_force(&key, &read)?.with_percent(percent.unwrap_or_default(), now, BY),
    };
    let written = gateway.call(
        &record::write(prefix, salt, &next, read.revision),
        record::parse_write,
    )?;
    if let Written::Lost(_) = written {
        return Err(Failure::changed_underneath());
    }
    match (sub.as_str(), next.state) {
        ("abort", _) => println!("aborted: every Envoy sends every user to stable within its poll_ms"),
        ("resume", _) => println!("resumed: every Envoy is back to the cohorts it had before the abort"),
        (_, State::Aborted) => println!(
            "percent: {} (the rollout is aborted: everyone stays on stable until `handoffctl rollout resume`)",
            percent_text(next.percent)
        ),
        _ => println!("percent: {}", percent_text(next.percent)),
    }
    Ok(())
}

/// The record a change starts from; a value that is not a record is not overwritten.
fn in_force(key: &str, read: &Read) -> Result<Record, Failure> {
    match &read.record {
        None => Ok(Record::absent()),
        Some(Ok(r)) => Ok(r.clone()),
        Some(Err(e)) => Err(Failure::invalid(format!(
            "{key} holds a value that is not a rollout record ({e}): fix or delete it, or `handoffctl rollout abort` to replace it"
        ))),
    }
}

/// A percent in hundredths as text: `30`, `12.5`; `configured` when the record has none.
fn percent_text(hundredths: Option<u32>) -> String {
    match hundredths {
        None => "configured".to_string(),
        Some(h) if h % 100 == 0 => (h / 100).to_string(),
        Some(h) => format!(
            "{}.{}",
            h / 100,
            format!("{:02}", h % 100).trim_end_matches('0')
        ),
    }
}

/// PERCENT in hundredths, rounded as the configuration's `canary.percent` is.
fn parse_percent(p: &str) -> Result<u32, Failure> {
    match p.parse::<f64>() {
        Ok(v) if (0.0..=100.0).contains(&v) => Ok(handoff::canary::threshold(v)),
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

/// Who judges the fleet and how many Envoys have counts published (their leases alive).
struct Fleet {
    judge: Option<String>,
    reporting: usize,
}

impl Fleet {
    fn read(gateway: &Gateway, prefix: &str, salt: &str) -> Result<Fleet, Failure> {
        let leader = record::leader_key(prefix, salt);
        let judge = gateway
            .call(&handoff::etcd::range(&leader), handoff::etcd::parse_range)?
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
        let counts = record::counts_prefix(prefix, salt);
        let reporting = gateway
            .call(
                &handoff::etcd::range_prefix(&counts),
                handoff::etcd::parse_range_all,
            )?
            .len();
        Ok(Fleet { judge, reporting })
    }

    /// The lines status prints (none when no Envoy judges or reports).
    fn text(&self) -> String {
        let mut out = String::new();
        if let Some(j) = &self.judge {
            out.push_str(&format!("judge: envoy:{j}\n"));
        }
        if self.judge.is_some() || self.reporting > 0 {
            out.push_str(&format!("envoys reporting counts: {}\n", self.reporting));
        }
        out
    }
}

fn status(
    gateway: &Gateway,
    key: &str,
    read: &Read,
    fleet: &Fleet,
    json: bool,
) -> Result<(), Failure> {
    if json {
        return status_json(gateway, key, read, fleet);
    }
    let r = match &read.record {
        None => {
            println!("no record: active at the configured percent");
            print!("{}", fleet.text());
            return Ok(());
        }
        Some(Ok(r)) => r,
        Some(Err(_)) => return in_force(key, read).map(|_| ()),
    };
    println!("state: {}", r.state.as_str());
    println!("percent: {}", percent_text(r.percent));
    println!("updated: {}", utc(r.updated_ms));
    println!("by: {}", if r.by.is_empty() { "-" } else { &r.by });
    println!(
        "reason: {}",
        if r.reason.is_empty() { "-" } else { &r.reason }
    );
    print!("{}", fleet.text());
    if let Some(w) = &r.window {
        print!("{}", window_table(w));
    }
    Ok(())
}

/// The record as stored, with its key and revision, the judge's id and how many Envoys report,
/// for scripts (`record` and `judge` are null when there is none).
fn status_json(gateway: &Gateway, key: &str, read: &Read, fleet: &Fleet) -> Result<(), Failure> {
    let stored = match read.record {
        None => serde_json::Value::Null,
        // Read again for the raw value: unknown keys a newer writer added are shown too.
        Some(_) => {
            let kv = gateway.call(&handoff::etcd::range(key), handoff::etcd::parse_range)?;
            kv.and_then(|kv| serde_json::from_slice(&kv.value).ok())
                .unwrap_or(serde_json::Value::Null)
        }
    };
    let mut out = serde_json::json!({
        "key": key,
        "record": stored,
        "judge": fleet.judge,
        "reporting": fleet.reporting,
    });
    if let Some(r) = read.revision {
        out["mod_revision"] = serde_json::json!(r);
    }
    println!("{out}");
    Ok(())
}

/// The last fleet window: one line of context and a row per cohort.
fn window_table(w: &FleetWindow) -> String {
    let q = quantile_label(f64::from(w.quantile) / 10_000.0);
    let bad = match (w.bad_errors, w.bad_latency) {
        (true, true) => " (errors and latency)",
        (true, false) => " (errors)",
        (false, true) => " (latency)",
        (false, false) => "",
    };
    let mut out = format!(
        "fleet window {} ({} s, {} Envoys, bad windows in a row: {}{bad})\n",
        w.window, w.window_s, w.envoys, w.bad_windows
    );
    out.push_str(&format!(
        "  {:<8} {:>10} {:>8} {:>10} {:>12}\n",
        "cohort",
        "requests",
        "errors",
        "error rate",
        format!("{q} (ms)")
    ));
    for (name, f) in [("stable", &w.stable), ("canary", &w.canary)] {
        let rate = if f.requests == 0 {
            "-".to_string()
        } else {
            format!("{:.2}%", 100.0 * f.errors as f64 / f.requests as f64)
        };
        out.push_str(&format!(
            "  {name:<8} {:>10} {:>8} {rate:>10} {:>12}\n",
            f.requests,
            f.errors,
            format!("{:.1}", f.quantile_us as f64 / 1000.0)
        ));
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percents_read_and_print_as_the_configuration_rounds_them() {
        assert_eq!(parse_percent("30").unwrap(), 3000);
        assert_eq!(parse_percent("12.345").unwrap(), 1235);
        assert_eq!(parse_percent("0").unwrap(), 0);
        assert_eq!(parse_percent("100").unwrap(), 10_000);
        for bad in ["-0.5", "100.01", "NaN", "inf", "", "30%"] {
            assert!(parse_percent(bad).is_err(), "{bad}");
        }
        for (h, text) in [
            (None, "configured"),
            (Some(3000), "30"),
            (Some(1250), "12.5"),
        ] {
            assert_eq!(percent_text(h), text);
        }
        assert_eq!(percent_text(Some(1)), "0.01");
    }

    #[test]
    fn times_print_in_utc_and_out_of_range_as_the_number() {
        assert_eq!(
            utc(1_764_620_000_000),
            "2025-12-01T20:13:20Z (1764620000000 ms)"
        );
        assert_eq!(utc(u64::MAX), format!("{} ms", u64::MAX));
    }
}
