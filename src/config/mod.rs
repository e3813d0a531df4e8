//! The plugin configuration: one JSON object with optional sections, parsed in two phases.
//! `serde` checks the shape (unknown keys are rejected everywhere), then each section's
//! `validate` checks the meaning. Every error names the JSON path of the offending field.

use serde::Deserialize;
use serde_json::Value;

pub mod canary;
pub mod drain;
mod error;
pub mod idempotency;
mod source;
pub mod translate;
mod walk;

pub use error::{check_header_name, ConfigError};

use crate::canary::Canary;
use crate::drain::Drain;
use crate::idempotency::Idempotency;
use crate::translate::{Backend, Translate};
use canary::RawCanary;
use drain::RawDrain;
use idempotency::RawIdempotency;
use translate::RawTranslate;

/// The configuration as written. Each absent section switches its capability off.
#[derive(Debug, Default, Deserialize)]
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub canary: Option<RawCanary>,
    pub translate: Option<RawTranslate>,
    pub idempotency: Option<RawIdempotency>,
    pub drain: Option<RawDrain>,
}

/// The validated configuration the filter runs with.
#[derive(Debug, Default)]
pub struct Config {
    pub canary: Option<Canary>,
    pub translate: Option<Translate>,
    pub idempotency: Option<Idempotency>,
    pub drain: Option<Drain>,
}

impl Config {
    /// Parses and validates the plugin configuration. Empty input is the same as `{}`.
    pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
        Config::try_from(RawConfig::parse(bytes)?)
    }

    /// The capabilities switched on, for the start-up log line.
    pub fn summary(&self) -> String {
        let mut on = Vec::new();
        if let Some(c) = &self.canary {
            let guard = match &c.guard {
                Some(g) => format!(" guarded ({} s windows)", g.window_s),
                None => String::new(),
            };
            let control = match &c.control {
                Some(e) => format!(", fleet control on etcd cluster {:?}", e.cluster),
                None => String::new(),
            };
            on.push(format!("canary {}%{guard}{control}", percent(c.threshold)));
        }
        if let Some(t) = &self.translate {
            on.push(format!("translate {} route(s)", t.routes.len()));
        }
        if let Some(i) = &self.idempotency {
            on.push(format!("idempotency ({})", i.store_summary()));
        }
        if let Some(d) = &self.drain {
            on.push(d.summary());
        }
        if on.is_empty() {
            "no capability configured (pass-through)".to_string()
        } else {
            on.join(", ")
        }
    }

    /// Whether a request's header stages read more than one request header: the filter then
    /// reads them all with one host call (a snapshot) rather than one call each. The canary
    /// alone with one id source reads one header, and one call is the cheaper then.
    pub fn reads_several_request_headers(&self) -> bool {
        let canary_reads = self.canary.as_ref().map_or(0, |c| {
            c.user_id.len()
                + usize::from(c.anonymous_cookie.is_some())
                + usize::from(c.override_.is_some())
                + usize::from(c.guard.is_some() || c.control.is_some())
        });
        self.translate.is_some()
            || self.idempotency.is_some()
            || self.drain.is_some()
            || canary_reads > 1
    }

    /// True when no capability is switched on: the filter passes everything through.
    pub fn is_empty(&self) -> bool {
        self.canary.is_none()
            && self.translate.is_none()
            && self.idempotency.is_none()
            && self.drain.is_none()
    }
}

impl RawConfig {
    /// The shape check alone: JSON text to the configuration as written.
    pub fn parse(bytes: &[u8]) -> Result<RawConfig, ConfigError> {
        let text = std::str::from_utf8(bytes)
            .map_err(|e| ConfigError::new("", format!("expected UTF-8 JSON text: {e}")))?;
        if text.trim().is_empty() {
            return Ok(RawConfig::default());
        }
        // The JSON syntax first (its errors say the line and column), then the shape. The id
        // lists skip the tree: the walk sees them empty, and they are put back after it.
        let (value, lists) = crate::json::parse_lists(bytes, canary::ID_LISTS)
            .map_err(|e| ConfigError::new(e.path, e.message))?;
        let mut raw = RawConfig::from_json(&value).map_err(|e| match e.path.is_empty() {
            true => ConfigError::new(".", e.message),
            false => e,
        })?;
        drop(value);
        if let Some(c) = raw.canary.as_mut() {
            c.put_back(lists);
        }
        Ok(raw)
    }
}

impl RawConfig {
    /// The configuration as written, from its parsed JSON.
    pub fn from_json(v: &Value) -> Result<RawConfig, ConfigError> {
        walk::object(v, "RawConfig", |o| RawConfig {
            canary: o.opt("canary", canary::walk),
            translate: o.opt("translate", translate::walk),
            idempotency: o.opt("idempotency", idempotency::walk),
            drain: o.opt("drain", drain::walk),
        })
    }
}

impl TryFrom<RawConfig> for Config {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Config, ConfigError> {
        let canary = raw
            .canary
            .map(|c| c.validate().map_err(|e| e.within("canary")))
            .transpose()?;
        let translate = raw
            .translate
            .map(|t| t.validate().map_err(|e| e.within("translate")))
            .transpose()?;
        // Following the cohort needs the section that decides it.
        if let (Some(t), None) = (&translate, &canary) {
            if let Some(i) = t
                .routes
                .iter()
                .position(|r| matches!(r.backend, Backend::Cohort { .. }))
            {
                return Err(ConfigError::new(
                    format!("translate.routes[{i}].backend"),
                    "a backend that follows the canary cohort ({\"stable\": .., \"canary\": ..}) \
                     needs the `canary` section",
                ));
            }
        }
        let idempotency = raw
            .idempotency
            .map(|c| c.validate().map_err(|e| e.within("idempotency")))
            .transpose()?;
        let drain = raw
            .drain
            .map(|d| d.validate().map_err(|e| e.within("drain")))
            .transpose()?;
        Ok(Config {
            canary,
            translate,
            idempotency,
            drain,
        })
    }
}

/// The canary percent as written (two decimals at most), from its bucket count: `12.5`, `10`,
/// `0.05`. Formatting the `f64` would bring core's float formatting (kilobytes) into the wasm.
fn percent(threshold: u32) -> String {
    let (whole, hundredths) = (threshold / 100, threshold % 100);
    match hundredths {
        0 => whole.to_string(),
        h if h % 10 == 0 => format!("{whole}.{}", h / 10),
        h => format!("{whole}.{h:02}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> ConfigError {
        Config::parse(json.as_bytes()).unwrap_err()
    }

    #[test]
    fn empty_config_switches_everything_off() {
        assert!(Config::parse(b"{}").unwrap().is_empty());
        assert!(Config::parse(b"").unwrap().is_empty());
        assert!(Config::parse(b"  \n").unwrap().is_empty());
    }

    #[test]
    fn unknown_top_level_key_is_rejected_by_name() {
        let e = err(r#"{"canery": {}}"#);
        assert!(e.message.contains("unknown field `canery`"), "{e}");
    }

    #[test]
    fn unknown_nested_key_names_its_path() {
        let e = err(
            r#"{"canary": {"salt": "s", "percent": 1, "user_id": [{"header": "x"}], "persent": 2}}"#,
        );
        assert_eq!(e.path, "canary.persent", "{e}");
    }

    /// serde reports an unknown key before a missing one, so a misspelled required key is
    /// named as written, with every field of its struct in the expected list.
    #[test]
    fn misspelled_required_key_is_reported_as_unknown() {
        let e = err(r#"{"canary": {"salt": "s", "persent": 1, "user_id": [{"header": "x"}]}}"#);
        assert_eq!(e.path, "canary.persent", "{e}");
        assert_eq!(
            e.message,
            "unknown field `persent`, expected one of `salt`, `percent`, `user_id`, \
             `route_header`, `allow`, `deny`, `anonymous_cookie`, `override`, `response_header`, \
             `guard`, `control`"
        );
        let e = err(r#"{"canary": {"salt": "s", "user_id": [{"header": "x"}]}}"#);
        assert_eq!(
            (e.path.as_str(), e.message.as_str()),
            ("canary", "missing field `percent`")
        );
    }

    #[test]
    fn wrong_type_names_its_path() {
        let e = err(r#"{"canary": {"salt": "s", "percent": "ten", "user_id": []}}"#);
        assert_eq!(e.path, "canary.percent", "{e}");
        let e = err(r#"{"canary": {"salt": "s", "percent": 1, "user_id": [{"header": 5}]}}"#);
        assert_eq!(e.path, "canary.user_id[0].header", "{e}");
    }

    /// The id lists skip the JSON tree; what is wrong in them is still named by index.
    #[test]
    fn a_bad_id_in_a_list_is_named_by_its_index() {
        let with = |lists: &str| {
            format!(
                r#"{{"canary": {{"salt": "s", "percent": 1, "user_id": [{{"header": "x"}}], {lists}}}}}"#
            )
        };
        let e = err(&with(r#""allow": ["a", "", "b"]"#));
        assert_eq!(e.path, "canary.allow[1]", "{e}");
        assert!(e.message.contains("non-empty user id"), "{e}");
        let e = err(&with(&format!(
            r#""deny": ["a", "{}"]"#,
            "x".repeat(crate::source::MAX_VALUE_LEN + 1)
        )));
        assert_eq!(e.path, "canary.deny[1]", "{e}");
        let e = err(&with(r#""allow": ["a", "b", 3]"#));
        assert_eq!(
            (e.path.as_str(), e.message.as_str()),
            (
                "canary.allow[2]",
                "invalid type: integer `3`, expected a string"
            )
        );
        let e = err(&with(r#""deny": "a""#));
        assert_eq!(
            (e.path.as_str(), e.message.as_str()),
            (
                "canary.deny",
                "invalid type: string \"a\", expected a sequence"
            )
        );
        let c = Config::parse(with(r#""allow": ["a", "b", "a"], "deny": ["b"]"#).as_bytes())
            .unwrap()
            .canary
            .unwrap();
        assert_eq!((c.allow.len(), c.deny.len()), (2, 1));
        assert!(c.allow.contains("a") && c.allow.contains("b") && !c.allow.contains("c"));
        assert!(c.deny.contains("b") && !c.deny.contains("a"));
    }

    #[test]
    fn not_json_is_rejected() {
        let e = err("canary: {}");
        assert!(e.to_string().contains("invalid configuration"), "{e}");
        assert!(Config::parse(&[0xff, 0xfe]).is_err());
    }

    /// Regression (fuzz/regressions/config_parse): an unknown key with a raw CR used to put a
    /// line break into the error log line.
    #[test]
    fn control_characters_in_keys_do_not_break_the_log_line() {
        let e = err(r#"{"&&\rTTTTTT":1}"#);
        let line = e.to_string();
        assert!(!line.contains('\r') && !line.contains('\n'), "{line:?}");
        assert!(line.contains("&&\\rTTTTTT"), "{line}");
    }

    #[test]
    fn percent_reads_as_the_number_written() {
        for t in 0..=10_000 {
            assert_eq!(percent(t), format!("{}", f64::from(t) / 100.0));
        }
    }
}
