//! JSON text to a [`Value`] that refuses a key written twice in one object.
//!
//! serde_json's own `Value` keeps the last of two equal keys, so `{"salt": "a", "salt": "b"}`
//! would start with salt "b" and no word said. A configuration that says a thing twice is a
//! mistake (usually a merge or a copy-paste), and the plugin refuses it naming the key's path.

use std::cell::RefCell;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, Error, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// Where the text is wrong: the JSON path (`.` for the text as a whole) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonError {
    pub path: String,
    pub message: String,
}

/// Parses `bytes`; a duplicate key is an error at that key's path.
pub fn parse(bytes: &[u8]) -> Result<Value, JsonError> {
    let duplicate = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let parsed = Strict {
        path: String::new(),
        duplicate: &duplicate,
    }
    .deserialize(&mut de)
    .and_then(|v| de.end().map(|()| v));
    match (parsed, duplicate.into_inner()) {
        (_, Some((path, key))) => Err(JsonError {
            path,
            message: format!("duplicate field `{key}` (a key may appear once per object)"),
        }),
        (Ok(v), None) => Ok(v),
        (Err(e), None) => Err(JsonError {
            path: ".".to_string(),
            message: e.to_string(),
        }),
    }
}

/// Any JSON text the filter reads as a [`Value`] (the drain admin body): one parser in the
/// wasm, not serde_json's `Value` deserializer beside this one.
pub fn value(bytes: &[u8]) -> Result<Value, String> {
    parse(bytes).map_err(|e| match e.path.as_str() {
        "." => e.message,
        path => format!("{path}: {}", e.message),
    })
}

/// A value at `path`; records the first duplicate key it meets in `duplicate`.
struct Strict<'a> {
    path: String,
    duplicate: &'a RefCell<Option<(String, String)>>,
}

impl Strict<'_> {
    fn child(&self, path: String) -> Strict<'_> {
        Strict {
            path,
            duplicate: self.duplicate,
        }
    }
}

impl<'de> DeserializeSeed<'de> for Strict<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E: Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_str<E: Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E: Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(v) =
            seq.next_element_seed(self.child(format!("{}[{}]", self.path, items.len())))?
        {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut members = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let path = match self.path.is_empty() {
                true => key.clone(),
                false => format!("{}.{key}", self.path),
            };
            if members.contains_key(&key) {
                *self.duplicate.borrow_mut() = Some((path, key));
                return Err(A::Error::custom("duplicate field"));
            }
            let v = map.next_value_seed(self.child(path))?;
            members.insert(key, v);
        }
        Ok(Value::Object(members))
    }
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn a_key_twice_is_refused_at_its_path() {
        let e = parse(br#"{"canary": {"user_id": [{"header": "a", "header": "b"}]}}"#).unwrap_err();
        assert_eq!(e.path, "canary.user_id[0].header");
        assert!(
            e.message.starts_with("duplicate field `header`"),
            "{}",
            e.message
        );
        let e = parse(br#"{"drain": {}, "drain": {}}"#).unwrap_err();
        assert_eq!(e.path, "drain");
    }

    #[test]
    fn the_same_key_in_different_objects_is_fine() {
        let v = parse(br#"{"a": {"k": 1}, "b": {"k": 2}, "c": [{"k": 3}, {"k": 4}]}"#).unwrap();
        let direct: serde_json::Value =
            serde_json::from_str(r#"{"a": {"k": 1}, "b": {"k": 2}, "c": [{"k": 3}, {"k": 4}]}"#)
                .unwrap();
        assert_eq!(v, direct);
    }

    #[test]
    fn syntax_errors_keep_their_line_and_column() {
        let e = parse(b"{\n  \"a\": nope\n}").unwrap_err();
        assert_eq!(e.path, ".");
        assert!(e.message.contains("line 2"), "{}", e.message);
        let e = parse(b"{} x").unwrap_err();
        assert!(e.message.contains("trailing characters"), "{}", e.message);
    }
}
