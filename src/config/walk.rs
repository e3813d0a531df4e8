//! The configuration's shape check: a walk over the parsed [`Value`] that builds the `Raw*`
//! types with small typed helpers, each error naming the JSON path of its field
//! (`canary.user_id[0].header`) in serde's words ("missing field `salt`", "unknown field
//! `persent`, expected one of ...", "invalid type: string \"ten\", expected f64"). Each
//! section's walk is beside its `Raw*` types (`config/canary.rs`, ...); these are the helpers
//! they share.
//!
//! Why not serde's derive: a derived `Deserialize` is generic code per struct and field type,
//! and putting the path on its errors (serde_path_to_error) doubled it again, about 150 KB of
//! the wasm all told; these helpers are shared by every field. The derives stay on the `Raw*`
//! types for the JSON Schema (schemars) and the unit tests, and `tests/config_paths.rs`
//! checks this walk against the derives over every example configuration broken every way.
//!
//! Each section's walk (and each nested object's) is `#[inline(never)]`, and the Makefile keeps
//! wasm-opt from inlining large functions that have one caller (`-ocimfs`): otherwise the whole
//! walk becomes one function of about 40 KB, and V8, which Envoy runs without its baseline
//! compiler, compiles it with TurboFan at start in memory that grows faster than the function.
//! Envoy's allocator keeps that memory: about 10 MiB of RSS per Envoy, measured.

use serde_json::{Map, Value};

use super::error::ConfigError;

pub(super) type Result<T> = std::result::Result<T, ConfigError>;
pub(super) type Parse<T> = fn(&Value) -> Result<T>;

pub(super) fn error(message: impl Into<String>) -> ConfigError {
    ConfigError::new("", message)
}

/// An object being read: the keys its fields asked for, in field order, and the first error.
/// Reading goes on after an error so that every field is asked for: the keys nobody asked for
/// are then the unknown ones, and the expected list names every field.
pub(super) struct Object<'a> {
    map: &'a Map<String, Value>,
    read: Vec<&'static str>,
    failed: Option<ConfigError>,
}

/// Reads the object `v` (serde's struct `name`) with `build`, which asks for each field through
/// [`Object`]'s methods. As serde's derive with `deny_unknown_fields` says it, an unknown key
/// is reported before a field's error.
pub(super) fn object<T>(v: &Value, name: &str, build: impl FnOnce(&mut Object) -> T) -> Result<T> {
    let Value::Object(map) = v else {
        return Err(invalid_type(v, &format!("struct {name}")));
    };
    let mut o = Object {
        map,
        read: Vec::new(),
        failed: None,
    };
    let built = build(&mut o);
    o.finish().map(|()| built)
}

impl Object<'_> {
    fn finish(self) -> Result<()> {
        match self.map.keys().find(|k| !self.read.contains(&k.as_str())) {
            Some(k) => Err(error(format!(
                "unknown field `{k}`, expected {}",
                one_of(&self.read)
            ))
            .within(k)),
            None => self.failed.map_or(Ok(()), Err),
        }
    }

    /// Marks `key` as a field and returns its value, if present.
    pub(super) fn get(&mut self, key: &'static str) -> Option<&Value> {
        self.read.push(key);
        self.map.get(key)
    }

    /// Keeps the first error; the value stands in until the walk reports it.
    fn keep<T: Default>(&mut self, key: &str, parsed: Result<T>) -> T {
        parsed.unwrap_or_else(|e| {
            self.failed.get_or_insert(e.within(key));
            T::default()
        })
    }

    /// A field that must be there.
    pub(super) fn req<T: Default>(&mut self, key: &'static str, parse: Parse<T>) -> T {
        match self.get(key) {
            Some(v) => {
                let parsed = parse(v);
                self.keep(key, parsed)
            }
            None => {
                self.failed
                    .get_or_insert_with(|| error(format!("missing field `{key}`")));
                T::default()
            }
        }
    }

    /// An `Option` field: absent or `null` is `None`.
    pub(super) fn opt<T>(&mut self, key: &'static str, parse: Parse<T>) -> Option<T> {
        match self.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => {
                let parsed = parse(v).map(Some);
                self.keep(key, parsed)
            }
        }
    }

    /// A field with a default when absent (`null` is not absent).
    pub(super) fn or<T>(&mut self, key: &'static str, parse: Parse<T>, default: fn() -> T) -> T {
        match self.get(key) {
            None => default(),
            Some(v) => {
                let parsed = parse(v).map(Some);
                self.keep(key, parsed).unwrap_or_else(default)
            }
        }
    }
}

pub(super) fn seq<T>(v: &Value, parse: Parse<T>) -> Result<Vec<T>> {
    let Value::Array(items) = v else {
        return Err(invalid_type(v, "a sequence"));
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        out.push(parse(item).map_err(|e| e.within(&format!("[{i}]")))?);
    }
    Ok(out)
}

pub(super) fn strings(v: &Value) -> Result<Vec<String>> {
    seq(v, string)
}

pub(super) fn string(v: &Value) -> Result<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        _ => Err(invalid_type(v, "a string")),
    }
}

pub(super) fn boolean(v: &Value) -> Result<bool> {
    match v {
        Value::Bool(b) => Ok(*b),
        _ => Err(invalid_type(v, "a boolean")),
    }
}

pub(super) fn float(v: &Value) -> Result<f64> {
    match v {
        Value::Number(n) => Ok(n.as_f64().unwrap_or_default()),
        _ => Err(invalid_type(v, "f64")),
    }
}

/// A non-negative integer up to `max`, named as serde names the Rust type.
pub(super) fn unsigned(v: &Value, max: u64, name: &str) -> Result<u64> {
    match v {
        Value::Number(n) if n.is_f64() => Err(invalid_type(v, name)),
        Value::Number(n) => match n.as_u64() {
            Some(u) if u <= max => Ok(u),
            _ => Err(error(format!(
                "invalid value: integer `{n}`, expected {name}"
            ))),
        },
        _ => Err(invalid_type(v, name)),
    }
}

pub(super) fn u64_(v: &Value) -> Result<u64> {
    unsigned(v, u64::MAX, "u64")
}

pub(super) fn u32_(v: &Value) -> Result<u32> {
    unsigned(v, u32::MAX.into(), "u32").map(|u| u as u32)
}

pub(super) fn usize_(v: &Value) -> Result<usize> {
    unsigned(v, usize::MAX as u64, "usize").map(|u| u as usize)
}

/// An enum variant as serde_json writes one: `"name"`, or `{"name": content}` (one key).
/// Returns the index of the name and the content, if any.
pub(super) fn variant<'a>(v: &'a Value, names: &[&str]) -> Result<(usize, Option<&'a Value>)> {
    let (key, content) = match v {
        Value::String(s) => (s, None),
        Value::Object(map) => match map.iter().next() {
            Some((k, c)) => (k, Some(c)),
            None => return Err(not_one_key()),
        },
        _ => return Err(invalid_type(v, "string or map")),
    };
    let Some(i) = names.iter().position(|n| *n == key.as_str()) else {
        return Err(error(format!(
            "unknown variant `{key}`, expected {}",
            one_of(names)
        )));
    };
    match v {
        Value::Object(map) if map.len() > 1 => Err(not_one_key()),
        _ => Ok((i, content)),
    }
}

pub(super) fn not_one_key() -> ConfigError {
    error("invalid value: map, expected map with a single key")
}

/// A variant without content (`"keep"`; `{"keep": null}` is the same to serde).
pub(super) fn unit_variant<T: Copy>(v: &Value, variants: &[(&str, T)]) -> Result<T> {
    let names: Vec<&str> = variants.iter().map(|(n, _)| *n).collect();
    let (i, content) = variant(v, &names)?;
    let (name, value) = variants[i];
    match content {
        Some(c) if !c.is_null() => Err(invalid_type(c, "unit variant").within(name)),
        _ => Ok(value),
    }
}

/// `invalid type: string "x", expected a string`, with serde_json's words for the value.
pub(super) fn invalid_type(v: &Value, expected: &str) -> ConfigError {
    let found = match v {
        Value::Null => "null".to_string(),
        Value::Bool(b) => format!("boolean `{b}`"),
        Value::Number(n) if n.is_f64() => format!("floating point `{n}`"),
        Value::Number(n) => format!("integer `{n}`"),
        Value::String(s) => format!("string {s:?}"),
        Value::Array(_) => "sequence".to_string(),
        Value::Object(_) => "map".to_string(),
    };
    error(format!("invalid type: {found}, expected {expected}"))
}

/// serde's list of the expected names: "`a`", "`a` or `b`", "one of `a`, `b`, `c`".
pub(super) fn one_of(names: &[&str]) -> String {
    match names {
        [a] => format!("`{a}`"),
        [a, b] => format!("`{a}` or `{b}`"),
        _ => {
            let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
            format!("one of {}", quoted.join(", "))
        }
    }
}
